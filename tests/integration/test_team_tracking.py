"""Tracking for a team (docs/tracking.md, "A server for your team"), with real components only.

- ``parsimony-tracking serve`` starts MLflow's server with basic auth: a request without credentials
  gets 401; users are added with ``add-user``; bad password files and hosts are refused, named.
- A run logs into it; its password is in none of its files, params, tags or log lines (a URL login in
  the config is masked in ``config.json`` and the params, and still used).
- ``parsimony-submit`` refuses a login the server refuses (naming the URI and the user) and the
  embedded SQLite store on a network filesystem (a real FUSE mount, and mount-table entries for
  the types no test can mount here: NFS, Lustre, GPFS, BeeGFS, CIFS need servers).
- On the 2-node local Slurm cluster: the server on the host's bridge address, a 2-node job and a
  4-task sweep (all 4 running at once) logging with credentials from the environment.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from system.config import ConfigError
from system.tracking.login import check_store_filesystem, network_store_error
from tests.mlflow_server import TEST_CLIENT_ENV
from tests.team_server import REPO, TeamServer, cli, write_password

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]
ALICE, ALICE_PW = "alice", "alice-s3cret-pw-4711"
CREDS = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")


@pytest.fixture(autouse=True)
def _no_ambient_login(monkeypatch):
    """No login from the environment: the MLflow credential variables unset (the tests set the ones
    they mean; a ~/.mlflow/credentials on the machine would still be read, and none exists on CI)."""
    for k in CREDS:
        monkeypatch.delenv(k, raising=False)
    for k, v in TEST_CLIENT_ENV.items():
        monkeypatch.setenv(k, v)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = TeamServer(tmp_path_factory.mktemp("team") / "srv").start()
    srv.add_user(ALICE, ALICE_PW)
    yield srv
    srv.stop()


def _search(uri: str, auth: tuple[str, str] | None) -> int:
    import base64

    req = urllib.request.Request(f"{uri}/api/2.0/mlflow/experiments/search", method="POST",
                                 data=b'{"max_results": 1}', headers={"Content-Type": "application/json"})
    if auth:
        req.add_header("Authorization", "Basic " + base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode())
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status
    except urllib.error.HTTPError as exc:
        return exc.code


def _files_holding(secret: str, *folders: Path) -> list[str]:
    hits = []
    for folder in folders:
        for p in Path(folder).rglob("*"):
            if p.is_file() and secret.encode() in p.read_bytes():
                hits.append(str(p))
    return hits


def _client(uri: str, user: str, password: str, monkeypatch):
    """A client logged in as ``user`` through MLflow's environment variables."""
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv(CREDS[0], user)
    monkeypatch.setenv(CREDS[1], password)
    return MlflowClient(tracking_uri=uri)


# ------------------------------------------------------------------------------------------ the server
def test_the_server_needs_a_login(server):
    assert _search(server.uri, None) == 401
    assert _search(server.uri, ("admin", "wrong-password-123")) == 401
    assert _search(server.uri, ("admin", server.admin_password)) == 200
    assert _search(server.uri, (ALICE, ALICE_PW)) == 200  # added by add-user
    # the workers remember checked logins (--login-cache-s, 60 by default), never a wrong password as right
    assert "auth_cache_ttl_seconds = 60" in (server.root / "auth.ini").read_text()
    assert _search(server.uri, ("admin", "wrong-password-123")) == 401
    assert _search(server.uri, (ALICE, ALICE_PW + "x")) == 401
    assert "give jobs: tracking.uri=" + server.uri in server.out
    root = server.root
    assert {"mlflow.db", "auth.db", "auth.ini", "artifacts"} <= {p.name for p in root.iterdir()}
    assert oct(root.stat().st_mode & 0o777) == "0o700"
    assert _files_holding(server.admin_password, root) == []  # the admin password is kept hashed only


def test_bad_password_files_and_hosts_are_refused(tmp_path):
    loose = write_password(tmp_path / "loose.pw", "some-password-123", mode=0o644)
    empty = write_password(tmp_path / "empty.pw", "", mode=0o600)
    cases = [(loose, "127.0.0.1", f"{loose}: others can read"), (tmp_path / "missing.pw", "127.0.0.1", "missing.pw"),
             (empty, "127.0.0.1", f"{empty}: empty")]
    good = write_password(tmp_path / "good.pw", "some-password-123")
    cases.append((good, "192.0.2.77", "--host 192.0.2.77: not an address of this machine"))
    for pw, host, says in cases:
        r = cli("serve", "--root", str(tmp_path / "srv"), "--host", host, "--password-file", str(pw))
        assert r.returncode == 2 and says in r.stderr, (says, r.stderr[-1000:])
    r = cli("serve", "--root", str(tmp_path / "srv"), "--password-file", str(good), "--login-cache-s", "-1")
    assert r.returncode == 2 and "--login-cache-s -1: must be >= 0" in r.stderr, r.stderr[-1000:]
    assert not (tmp_path / "srv").exists()  # nothing was started or written


# ------------------------------------------------------------------------------------------ a run
def test_a_run_logs_in_and_keeps_no_secret(server, tmp_path, monkeypatch):
    """A URL login in tracking.uri: used to log in, masked in config.json, the params and the logs."""
    from tests.methods_util import TINY

    exp = "team-local"
    host = server.uri[len("http://"):]
    args = [*TINY, f"run.root={tmp_path}", f"run.dir={tmp_path / 'run'}", "train.max_steps=6",
            "tracking.enabled=true", f"tracking.uri=http://{ALICE}:{ALICE_PW}@{host}", f"tracking.experiment={exp}"]
    env = {k: v for k, v in os.environ.items() if k not in CREDS}
    r = subprocess.run([sys.executable, "-m", "launch.train", *args], cwd=REPO, capture_output=True, text=True,
                       timeout=300, env={**env, **TEST_CLIENT_ENV, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    assert ALICE_PW not in r.stdout + r.stderr
    assert "***:***@" in r.stderr  # the tracker's log lines name the server, masked
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["tracking"]["uri"] == f"http://***:***@{host}"
    assert _files_holding(ALICE_PW, tmp_path) == []
    client = _client(server.uri, ALICE, ALICE_PW, monkeypatch)
    (run,) = client.search_runs([client.get_experiment_by_name(exp).experiment_id])
    assert run.info.status == "FINISHED" and run.data.metrics
    assert run.data.params["tracking.uri"] == f"http://***:***@{host}"
    assert not [k for k, v in {**run.data.params, **run.data.tags}.items() if ALICE_PW in v]
    # launch.compare reads the same credential sources
    out = subprocess.run([sys.executable, "-m", "launch.compare", "--tracking-uri", server.uri, "--experiment", exp,
                          "--json"], cwd=REPO, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    assert out.returncode == 0, out.stderr[-2000:]
    assert [row["run_id"] for row in json.loads(out.stdout)] == [run.info.run_id]


def _submit_cli(tmp_path: Path, *overrides: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "launch.submit", "--config", str(REPO / "configs" / "demo.yaml"),
                           "launch.cluster=local", f"run.root={tmp_path / 'runs'}",
                           f"launch.folder={tmp_path / 'submitit'}", "train.max_steps=4", *overrides],
                          cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, **TEST_CLIENT_ENV, "PYTHONPATH": str(REPO), **env})


def test_a_refused_login_is_an_error_at_submission(server, tmp_path):
    r = _submit_cli(tmp_path, f"tracking.uri={server.uri}",
                    env={CREDS[0]: ALICE, CREDS[1]: "not-her-password"})
    assert r.returncode == 2
    assert f"MLflow server {server.uri} refused the login of user 'alice' (HTTP 401" in r.stderr, r.stderr[-2000:]
    assert "nothing was submitted" in r.stderr
    assert not (tmp_path / "submitit").exists() and not (tmp_path / "runs").exists()
    dead = _submit_cli(tmp_path, "tracking.uri=http://127.0.0.1:9", env={})
    assert dead.returncode == 2 and "http://127.0.0.1:9 is unreachable" in dead.stderr, dead.stderr[-2000:]


# ------------------------------------------------------------------------------------------ network filesystems
MOUNTINFO = """\
22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw
40 22 0:50 / /home rw,relatime shared:20 - nfs4 filer:/export/home rw,vers=4.2
41 22 0:51 / /lustre rw,relatime - lustre 10.0.0.1@tcp:/scratch rw
42 22 0:52 / /gpfs/proj rw,relatime - gpfs proj rw
43 22 0:53 / /beegfs rw,relatime - beegfs beegfs_nodev rw
44 22 0:54 / /mnt/share\\040drive rw,relatime - cifs //nas/share rw
45 40 8:2 / /home/alice/local rw,relatime - ext4 /dev/sdb1 rw
"""


@pytest.mark.parametrize("path, fstype", [("/home/bob/runs", "nfs4"), ("/lustre/u/runs", "lustre"),
                                          ("/gpfs/proj/runs", "gpfs"), ("/beegfs/runs", "beegfs"),
                                          ("/mnt/share drive/runs", "cifs"), ("/home/alice/local/runs", None),
                                          ("/scratch/runs", None)])
def test_network_filesystems_from_mount_table_entries(path, fstype):
    """The types a test cannot mount here (they need their servers), read from a mount table."""
    uri = f"sqlite:///{path}/mlflow.db"
    assert check_store_filesystem(uri, mountinfo=MOUNTINFO) == fstype
    if fstype:
        err = network_store_error(uri, fstype)
        assert isinstance(err, ConfigError) and err.key == "run.root"
        assert path in str(err) and fstype in str(err) and "parsimony-tracking serve" in str(err)


@pytest.fixture
def fuse_mount(tmp_path):
    """A real FUSE filesystem (bindfs) over a local folder."""
    if shutil.which("bindfs") is None:
        pytest.skip("bindfs is not installed (deps/apt.txt installs it)")
    src, mnt = tmp_path / "src", tmp_path / "mnt"
    src.mkdir()
    mnt.mkdir()
    r = subprocess.run(["bindfs", str(src), str(mnt)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"this machine cannot mount FUSE filesystems: {r.stderr.strip()[-300:]}")
    yield mnt
    subprocess.run(["fusermount", "-u", str(mnt)], capture_output=True)


def test_submission_with_the_embedded_store_on_a_network_filesystem_is_refused(fuse_mount, tmp_path):
    r = subprocess.run([sys.executable, "-m", "launch.submit", "--config", str(REPO / "configs" / "demo.yaml"),
                        "launch.cluster=local", f"run.root={fuse_mount / 'runs'}",
                        f"launch.folder={tmp_path / 'submitit'}"],
                       cwd=REPO, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "PYTHONPATH": str(REPO)})
    assert r.returncode == 2, r.stderr[-2000:]
    assert "run.root" in r.stderr and str(fuse_mount / "runs") in r.stderr and "(fuse)" in r.stderr
    assert "parsimony-tracking serve" in r.stderr and "nothing was submitted" in r.stderr
    assert not (fuse_mount / "runs").exists() and not (tmp_path / "submitit").exists()


# ------------------------------------------------------------------------------------------ on the cluster
@pytest.fixture(scope="module")
def cluster_server(tmp_path_factory, slurm_cluster):
    """The team server on this host's address on the nodes' bridge (where a compute node reaches it)."""
    from tests.slurm_cluster import multi_partition

    multi_partition()  # skips, saying why, where the machine forbids the namespaced nodes
    bridge = os.environ.get("PARSIMONY_SLURM_SUBNET", "10.77.0") + ".1"
    srv = TeamServer(tmp_path_factory.mktemp("team-cluster") / "srv", host=bridge).start()
    srv.add_user(ALICE, ALICE_PW)
    yield srv
    srv.stop()


def _cluster_submit(root: Path, server: TeamServer, name: str, nodes: int, *more: str, sweeps=None):
    from launch import submitting as S
    from launch.config import load_job
    from tests.integration.test_submit import CONFIG, TINY
    from tests.slurm_cluster import multi_partition

    launch, jobs = load_job(CONFIG, [*TINY, f"run.root={root / 'runs'}", f"launch.folder={root / 'submitit' / '%j'}",
                                     f"run.name={name}", f"launch.partition={multi_partition()}",
                                     f"launch.nodes={nodes}", "launch.tasks_per_node=1", "launch.cpus_per_task=1",
                                     f"tracking.uri={server.uri}", "tracking.experiment=team-cluster", *more], sweeps)
    return S.submit(launch, jobs)


@pytest.mark.slurm
def test_cluster_jobs_log_into_the_team_server(cluster_server, tmp_path, monkeypatch):
    """A 2-node job and a 4-task sweep (all 4 at once) log as alice, with credentials from the environment
    only; the password is then in no file of the runs or the jobs, and in no param or tag."""
    monkeypatch.setenv(CREDS[0], ALICE)
    monkeypatch.setenv(CREDS[1], ALICE_PW)
    (two,) = _cluster_submit(tmp_path, cluster_server, "team-2n", 2, "engine.kind=deepspeed", "train.max_steps=6",
                             "checkpoint.every_steps=3")
    assert len(two.job.results()) == 2  # (the sweep then has the 2 nodes' 4 CPUs to itself)
    sweep = _cluster_submit(tmp_path, cluster_server, "team-sweep", 1, "engine.kind=local", "train.max_steps=6",
                            "checkpoint.every_steps=0", "train.threads=1", "launch.array_parallelism=4",
                            sweeps=["train.seed=0,1,2,3"])
    assert len(sweep) == 4
    for s in sweep:
        s.job.result()
    client = _client(cluster_server.uri, ALICE, ALICE_PW, monkeypatch)
    exp = client.get_experiment_by_name("team-cluster")
    runs = {r.info.run_name: r for r in client.search_runs([exp.experiment_id])}
    assert set(runs) == {two.run_name, *(s.run_name for s in sweep)}
    for r in runs.values():
        assert r.info.status == "FINISHED"
        assert client.get_metric_history(r.info.run_id, "train/loss")
    assert runs[two.run_name].data.tags["world_size"] == "2"
    summary = json.loads((two.run_dir / "summary.json").read_text())
    assert summary["mlflow_model_uri"]  # the final network, logged as an MLflow Model through the server
    assert client.list_artifacts(runs[two.run_name].info.run_id)
    # the 4 array tasks ran at once: every one started before any ended
    swept = [runs[s.run_name].info for s in sweep]
    assert max(i.start_time for i in swept) < min(i.end_time for i in swept)
    assert _files_holding(ALICE_PW, tmp_path) == []  # runs, checkpoints, submitit's job files and logs
    for r in runs.values():
        assert not [k for k, v in {**r.data.params, **r.data.tags}.items() if ALICE_PW in v]


@pytest.mark.slurm
def test_a_wrong_password_is_refused_before_anything_reaches_slurm(cluster_server, tmp_path, monkeypatch):
    from launch.slurm_cmd import run_slurm
    from system.tracking.login import LoginRefused

    monkeypatch.setenv(CREDS[0], ALICE)
    monkeypatch.setenv(CREDS[1], "wrong-password-123")
    before = run_slurm("squeue", "-h", "-o", "%i")
    with pytest.raises(LoginRefused, match=f"{cluster_server.uri} refused the login of user 'alice'"):
        _cluster_submit(tmp_path, cluster_server, "team-refused", 2, "engine.kind=deepspeed")
    # no new job (the earlier test's jobs may still be leaving the queue)
    assert set(run_slurm("squeue", "-h", "-o", "%i").split()) <= set(before.split())
    assert not (tmp_path / "submitit").exists()
