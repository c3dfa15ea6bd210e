"""The runs of a test script's command line: argument lists split by ``--then``, trained one after the other in the
same processes (two interpreters fewer to start for each run after the first)."""


def split_runs(argv: list[str]) -> list[list[str]]:
    """``argv``'s runs: ``["a", "--then", "b", "c"]`` gives ``[["a"], ["b", "c"]]``."""
    runs: list[list[str]] = [[]]
    for arg in argv:
        if arg == "--then":
            runs.append([])
        else:
            runs[-1].append(arg)
    return runs
