"""A real one-node Slurm cluster in a temporary directory: munged, slurmctld and slurmd from Debian's
slurm-wlm and munge packages, on their own ports, socket and key, so nothing of the host's is used."""
from __future__ import annotations

import getpass
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

from scripts.demo import free_port

DAEMONS = ("munged", "slurmctld", "slurmd")


class SlurmCluster:
    def __init__(self, root: Path, cpus: int = 2):
        self.root, self.cpus = root, cpus
        self.conf = root / "slurm.conf"
        self.env = {"SLURM_CONF": str(self.conf)}

    def start(self) -> "SlurmCluster":
        missing = [d for d in (*DAEMONS, "sbatch", "srun") if shutil.which(d) is None]
        if missing:
            raise RuntimeError(f"{missing} not installed: `apt-get install slurm-wlm munge` as root (`make test` does)")
        root, host = self.root, socket.gethostname()
        for folder in ("state", "spool", "munge"):
            (root / folder).mkdir(parents=True, exist_ok=True)
        key = root / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        socket_path = root / "munge" / "munge.socket"
        self.conf.write_text("\n".join([
            "ClusterName=vf-test",
            f"SlurmctldHost={host}",
            "SlurmUser=root",
            "AuthType=auth/munge",
            # A requeued job starts again once its old credential expires: seconds here, not minutes.
            f"AuthInfo=socket={socket_path},cred_expire=5",
            "CredType=cred/munge",
            f"SlurmctldPort={free_port()}",
            f"SlurmdPort={free_port()}",
            f"StateSaveLocation={root / 'state'}",
            f"SlurmdSpoolDir={root / 'spool'}",
            f"SlurmctldPidFile={root / 'slurmctld.pid'}",
            f"SlurmdPidFile={root / 'slurmd.pid'}",
            f"SlurmctldLogFile={root / 'slurmctld.log'}",
            f"SlurmdLogFile={root / 'slurmd.log'}",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core",
            "ReturnToService=2",
            "MpiDefault=none",
            "KillWait=30",
            "SchedulerParameters=bf_interval=1",  # start a requeued job as soon as it may start
            # A job's final state stays queryable after it ends (there is no accounting database).
            "MinJobAge=600",
            f"NodeName={host} CPUs={self.cpus} State=UNKNOWN",
            "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP",
            "",
        ]))
        subprocess.run(["munged", "--force", f"--socket={socket_path}", f"--key-file={key}",
                        f"--pid-file={root / 'munge' / 'munged.pid'}", f"--log-file={root / 'munge' / 'munged.log'}",
                        f"--seed-file={root / 'munge' / 'seed'}"], check=True)
        subprocess.run(["slurmctld", "-f", str(self.conf)], check=True)
        subprocess.run(["slurmd", "-f", str(self.conf)], check=True)
        deadline = time.monotonic() + 60
        while "idle" not in self.run("sinfo", "--noheader", "--format=%t", check=False).stdout:
            if time.monotonic() > deadline:
                raise RuntimeError(f"the test cluster did not come up:\n{self.logs()}")
            time.sleep(0.5)
        return self

    def run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run(args, env={**os.environ, **self.env}, capture_output=True, text=True, check=check)

    def state(self, job_id: str) -> str:
        out = self.run("scontrol", "show", "job", "--oneliner", job_id).stdout
        return out.split("JobState=")[1].split()[0]

    def logs(self) -> str:
        return "\n".join(p.read_text()[-3000:] for p in (self.root / "slurmctld.log", self.root / "slurmd.log") if p.is_file())

    def stop(self) -> None:
        """Jobs first: their processes would outlive the daemons and take the cores of later tests."""
        self.run("scancel", "--user", getpass.getuser(), check=False)
        deadline = time.monotonic() + 60
        while self.run("squeue", "--noheader", check=False).stdout.strip() and time.monotonic() < deadline:
            time.sleep(0.5)
        for pid_file in (self.root / "slurmd.pid", self.root / "slurmctld.pid", self.root / "munge" / "munged.pid"):
            try:
                os.kill(int(pid_file.read_text().split()[0]), signal.SIGTERM)
            except (OSError, ValueError):
                pass
        time.sleep(1)
