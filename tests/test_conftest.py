"""The suite's own housekeeping: the in-memory folders failed sessions leave do not pile up."""
from __future__ import annotations

import os
import subprocess
import sys

from conftest import SHM_PREFIX, remove_old_sessions


def test_only_the_newest_failed_sessions_folders_stay_and_a_running_session_s_is_left_alone(tmp_path):
    ended = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                           text=True, check=True)
    dead = int(ended.stdout)
    names = [f"{SHM_PREFIX}{dead}-k{i}" for i in range(5)] + [f"{SHM_PREFIX}old{i}" for i in range(2)]
    for age, name in enumerate(reversed(names)):  # the first name is the newest
        (tmp_path / name).mkdir()
        (tmp_path / name / "teacher.safetensors").write_bytes(b"x")
        os.utime(tmp_path / name, (1000 + age, 1000 + age))
    running = tmp_path / f"{SHM_PREFIX}{os.getpid()}-now"
    running.mkdir()
    os.utime(running, (1, 1))  # the oldest of all, but its session runs
    (tmp_path / "someone-else").mkdir()
    removed = remove_old_sessions(tmp_path, keep=3)
    assert sorted(p.name for p in removed) == sorted(names[3:])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*names[:3], running.name, "someone-else"])
