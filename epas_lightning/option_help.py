"""The ``--help`` of the ``fit``/``validate``/``test`` options whose Lightning docstring does not say what they do
here (:data:`HELP_HERE`)."""

WEIGHTS_ONLY_HELP = (
    "Always true: a checkpoint loads with weights_only=True (tensors and plain data; nothing else is unpickled), "
    "and false is refused."
)
CKPT_PATH_HELP = (
    "The checkpoint to resume (fit) or score (validate, test): a .ckpt file or a sharded (FSDP2) checkpoint folder, "
    "checked to read without running code; `last`: the newest last.ckpt of this run (checkpoint.dirpath, or the "
    "version_*/checkpoints folders of the logger's save_dir/name), an error when there is none; `auto`: the same, or "
    "with none, fit starts from scratch and validate/test score the configured model. Lightning's best, hpc and "
    "registry are not keywords here."
)
LR_MONITOR_INTERVAL_HELP = (
    "`step` (the default here): the learning rate of every optimizer, once per optimizer step; `epoch`: once per "
    "epoch; null: at each scheduler's own interval (`step` for the default WarmupCosineLR)."
)
SAVE_LAST_HELP = (
    "true (the default here): last.ckpt is written with every save, at a graceful stop and when training ends, and "
    "holds the step training ended at (what --ckpt_path last resumes); `link`: last.ckpt is a symbolic link to the "
    "newest checkpoint; false: only a graceful stop (SIGTERM, Ctrl+C) writes one."
)
LOGGER_HELP = (
    "Logger (or list of loggers) for experiment tracking. Default here: a TensorBoardLogger writing "
    "runs/epas/version_N (save_dir runs, name epas); true: Lightning's TensorBoardLogger in "
    "lightning_logs/version_N under trainer.default_root_dir; false: no logging. With several loggers, the run's "
    "checkpoints go into the first one's log_dir."
)
DIRPATH_HELP = (
    "The folder of the run's checkpoints. Default: the checkpoints/ folder of the first logger's version folder "
    "(runs/epas/version_N/checkpoints), or <trainer.default_root_dir>/checkpoints without a logger. A fit that does "
    "not resume from it refuses a folder that already holds checkpoints; on several nodes every node must mount it "
    "at the same path."
)
HELP_HERE = {
    "weights_only": WEIGHTS_ONLY_HELP,  # Lightning's help advises false for trusted checkpoints
    "ckpt_path": CKPT_PATH_HELP,  # Lightning's names its own keywords, not resume.py's
    "lr_monitor.logging_interval": LR_MONITOR_INTERVAL_HELP,  # Lightning's says it defaults to None
    "checkpoint.save_last": SAVE_LAST_HELP,  # Lightning's says it defaults to None
    "checkpoint.dirpath": DIRPATH_HELP,  # Lightning's says None keeps checkpoints in memory, saving nothing to disk
    "trainer.logger": LOGGER_HELP,  # Lightning's says it defaults to True
}
"""The help of the options whose Lightning docstring does not say what they do here."""
