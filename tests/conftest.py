"""Shared fixtures. No test writes to the real home cache or into the repository."""

import ast
import os
from contextlib import contextmanager
from functools import cache
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

# One intra-op thread, here and in every subprocess a test starts: with the tiny models of the tests, OpenMP's
# hand-off between two threads costs more than it saves, and on a 2-core machine the ranks of a multi-process test
# (or another job) would otherwise fight over the cores. A value the caller exported is kept.
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

TINY_CORPUS_MAX_BYTES = 1_500_000
TINY_CORPUS_VOCAB_SIZE = 512


@pytest.fixture(scope="session")
def epas_cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One cache directory for the whole session (``EPAS_CACHE_DIR`` points here in every test)."""
    return tmp_path_factory.mktemp("epas_cache")


@pytest.fixture(autouse=True)
def _isolated_epas_cache(monkeypatch: pytest.MonkeyPatch, epas_cache_dir: Path) -> None:
    monkeypatch.setenv("EPAS_CACHE_DIR", str(epas_cache_dir))


@contextmanager
def no_distributed_state_left():
    """A Trainer with a distributed strategy (FSDP2 on one device here) keeps its process group and leaves
    ``LOCAL_RANK``, ``NODE_RANK`` and ``MASTER_*`` in the environment: a multi-rank subprocess started by a later test
    inherits them, takes itself for an already launched rank and waits for peers that never come. A process group
    that failed to start (its port held) leaves torch's count of groups at 1, which only destroying a group resets:
    the next in-process FSDP2 fit then failed "Could not resolve the process group registered under the name 1".
    A strategy also sets Lightning's process-wide ``rank_zero_only.rank`` to its global rank: after a test that built
    one as rank 1 (a launcher's environment), every later test in that worker lost its ``rank_zero_info`` lines.
    This puts all three back as they were (for every test, and around a module fixture's in-process fits)."""
    from lightning_utilities.core.rank_zero import rank_zero_only  # the one object Lightning's strategies set

    environment, rank = dict(os.environ), getattr(rank_zero_only, "rank", None)
    try:
        yield
    finally:
        if rank is not None:
            rank_zero_only.rank = rank
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
        if dist.is_available():
            dist.distributed_c10d._world.group_count = 0  # as destroy_process_group() leaves it
        os.environ.clear()
        os.environ.update(environment)


@pytest.fixture(autouse=True)
def _no_distributed_state_outlives_a_test():
    with no_distributed_state_left():
        yield


@pytest.fixture(scope="session")
def tiny_corpus(epas_cache_dir: Path) -> Path:
    """The built-in corpus cut to its first 1.5 MB with a 512-token vocabulary, prepared once per session.

    It lives in the session's ``EPAS_CACHE_DIR``, so ``TokenDataModule(vocab_size=512, max_bytes=1_500_000)``
    reuses it instead of building again.
    """
    from epas_lightning.data import prepare_builtin_corpus

    return prepare_builtin_corpus(TINY_CORPUS_VOCAB_SIZE, cache_dir=epas_cache_dir, max_bytes=TINY_CORPUS_MAX_BYTES)


@pytest.fixture(scope="session")
def debug_fit_run(tiny_corpus: Path, tmp_path_factory: pytest.TempPathFactory):
    """``python -m epas_lightning fit --config configs/debug.yaml --sharing.interval 3``, run once for the tests that
    read what a run through the entry point prints and writes: (its CompletedProcess, the folder it ran in). Tests
    only read that folder; one that trains on copies it first."""
    from helpers import DEBUG_CONFIG, run_cli

    cwd = tmp_path_factory.mktemp("debug_fit")
    return run_cli(["fit", "--config", DEBUG_CONFIG, "--sharing.interval", "3"], cwd, tiny_corpus.parent), cwd


# Tests that take one of these costly module or session fixtures (or one made from it) run in one pytest-xdist worker:
# a second worker that got one of them built the fixture again (test_serve's two servers, each a fresh process loading
# a model; a fit through the entry point; two rank processes). xdist_group marks cannot do it: pytest-xdist 3.8's
# loadgroup renames the items, which pytest 9 ignores.
SHARED_FIXTURES = {
    "test_serve servers": {"server", "client", "long_server", "long_server_started"},
    "debug_fit_run": {"debug_fit_run"},
    "two_rank_runs": {"two_rank_runs"},
    "torchrun_runs": {"torchrun_runs"},
    "launched_runs": {"launched_runs", "sharded_runs"},  # test_distributed: sharded_runs is a part of launched_runs
}


@cache
def shared_fixture_groups(folder: Path) -> dict[str, str]:
    """``{"tests/<file>::<test function>": group}`` for the test functions of ``folder`` whose arguments name a
    fixture of ``SHARED_FIXTURES`` (read from the source: the controller process collects no tests)."""
    groups = {}
    for path in sorted(folder.glob("test_*.py")):
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.FunctionDef) and node.name.startswith("test_"):
                names = {arg.arg for arg in node.args.args}
                for group, fixtures in SHARED_FIXTURES.items():
                    if names & fixtures:
                        groups[f"{folder.name}/{path.name}::{node.name}"] = group
    return groups


def pytest_xdist_make_scheduler(config, log):
    """``--dist load`` (the default), except that the tests of a ``SHARED_FIXTURES`` group go to one worker: each
    group is a unit of work, handed out first (the largest first), then every other test one by one."""
    if config.getvalue("dist") != "load":
        return None
    from xdist.scheduler import LoadScopeScheduling

    groups = shared_fixture_groups(Path(__file__).parent)

    class SharedFixtureScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return groups.get(nodeid.split("[", 1)[0], nodeid)

    return SharedFixtureScheduling(config, log)
