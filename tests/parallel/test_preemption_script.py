"""launch/slurm/preemption.sh, run by bash with SLURM's commands stood in for.

SIGUSR1 to the batch shell must reach the training ranks (and not their
launcher), the job step must end normally, and the job must requeue itself.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "launch" / "slurm" / "preemption.sh"

FAKE_PROCESS = """
import os, signal, sys, time
log = os.environ["LOG"]
def stop(signum, frame):
    open(log, "a").write(sys.argv[1] + " got USR1\\n")
    sys.exit(0)
signal.signal(signal.SIGUSR1, stop)
open(log, "a").write(sys.argv[1] + " ready\\n")
time.sleep(60)
"""

BATCH = """
set -euo pipefail
source "$SCRIPT"
srun() { while [[ "$1" == --* ]]; do shift; done; "$@"; }   # runs the step here
scontrol() { echo "scontrol $*" >> "$LOG"; }
python3 "$FAKE" torchrun harness.pretrain &                 # a launcher: must not get SIGUSR1
launcher=$!
harness_run srun python3 "$FAKE" rank -m harness.pretrain
kill "$launcher"
echo "step exited 0" >> "$LOG"
"""


def test_usr1_reaches_the_ranks_and_the_job_requeues(tmp_path):
    fake, log = tmp_path / "fake.py", tmp_path / "log"
    fake.write_text(FAKE_PROCESS)
    env = {**os.environ, "SCRIPT": str(SCRIPT), "FAKE": str(fake), "LOG": str(log), "SLURM_JOB_ID": "1234"}
    proc = subprocess.Popen(["bash", "-c", BATCH], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    deadline = time.monotonic() + 30
    while not (log.exists() and log.read_text().count("ready") == 2) and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGUSR1)
    out, _ = proc.communicate(timeout=30)
    lines = log.read_text().splitlines()
    assert proc.returncode == 0, out
    assert "rank got USR1" in lines and "torchrun got USR1" not in lines, lines
    assert lines[-2:] == ["scontrol requeue 1234", "step exited 0"], lines
    assert "every rank checkpoints and stops" in out


def test_a_step_that_ends_by_itself_does_not_requeue(tmp_path):
    log = tmp_path / "log"
    batch = f'source "{SCRIPT}"; scontrol() {{ echo requeued >> "{log}"; }}; harness_run {sys.executable} -c "pass"'
    subprocess.run(["bash", "-c", batch], check=True, env={**os.environ, "SLURM_JOB_ID": "1"}, timeout=30)
    assert not log.exists()
