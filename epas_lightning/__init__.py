"""EPAS progressive activation sharing for LLaMA training with PyTorch Lightning.

The public API: the model (``Llama``, ``LlamaConfig``), the Lightning pieces (``EPASModule``, ``ProgressiveSharing``,
``TokenDataModule``), the schedule, the FLOPs model, inference, HF import/export, evaluation and the
redundancy analysis. Each name is imported on first use, so ``import epas_lightning`` loads neither torch nor
Lightning.
"""

from epas_lightning.lazy import lazy_exports

__version__ = "0.1.0"

__all__, __getattr__, __dir__ = lazy_exports(
    __name__,
    {
        ".analysis": ["RedundancyReport", "analyze_model", "capture_activations", "linear_cka"],
        ".callbacks": ["ProgressiveSharing", "TokenThroughputMonitor"],
        ".checkpoint": ["LoadedModel", "consolidate", "load_model"],
        ".checkpoint_io": ["AtomicCheckpointIO"],
        ".data": ["TokenDataModule", "prepare_builtin_corpus", "prepare_dataset"],
        ".divergence": ["DivergenceGuard"],
        ".errors": ["TrainingDiverged", "UserError"],
        ".evaluation": ["evaluate_perplexity", "evaluate_task"],
        ".flops": ["estimate_flops", "flop_cut", "matmul_params"],
        ".hf": ["config_from_hf", "load_hf_state"],
        ".hf.export": ["export"],
        ".inference": ["GenerationResult", "generate", "set_region"],
        ".interrupt": ["GracefulStop"],
        ".loss": ["lm_loss", "next_token_loss"],
        ".lr": ["WarmupCosineLR"],
        ".model": ["KVCache", "Llama", "LlamaConfig", "SharingState"],
        ".module": ["EPASModule"],
        ".optim": ["param_groups"],
        ".region": ["TrainedRegion"],
        ".run_checkpoint": ["RunCheckpoint"],
        ".schedule": ["SharingSchedule", "resolve_target"],
        ".strategy": ["FSDP2Strategy"],
    },
)
