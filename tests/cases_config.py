"""Bad options: PruneConfig refuses them before anything touches the model."""
from bad_input_table import Case
from loraprune.config import PruneConfig


def _cfg(**kw):
    return lambda tmp_path: PruneConfig(**kw)


CASES = [
    Case("config-ratio-zero", _cfg(ratio=0.0), r"ratio must be > 0"),
    Case("config-ratio-one", _cfg(ratio=1.0), r"ratio must be < 1"),
    Case("config-ratio-string", _cfg(ratio="0.5"), r"ratio must be a finite number"),
    Case("config-ratio-nan", _cfg(ratio=float("nan")), r"ratio must be a finite number"),
    Case("config-steps-zero", _cfg(steps=0), r"steps must be >= 1"),
    Case("config-steps-float", _cfg(steps=10.5), r"steps must be an integer"),
    Case("config-lr-negative", _cfg(lr=-1e-4), r"lr must be > 0"),
    Case("config-lora-r-zero", _cfg(lora_r=0), r"lora_r must be >= 1"),
    Case("config-dropout-one", _cfg(lora_dropout=1.0), r"lora_dropout must be < 1"),
    Case("config-criterion-typo", _cfg(criterion="loar"), r"criterion must be one of 'lora'"),
    Case("config-normalize-unknown", _cfg(normalize="sum"), r"normalize must be one of"),
    Case("config-ema-one", _cfg(ema=1.0), r"ema must be < 1"),
    Case("config-ranking-unknown", _cfg(ranking="best"), r"ranking must be one of"),
    Case("config-round-to-zero", _cfg(round_to=0), r"round_to must be >= 1"),
    Case("config-batch-size-zero", _cfg(batch_size=0), r"batch_size must be >= 1"),
    Case("config-grad-accum-zero", _cfg(grad_accum=0), r"grad_accum must be >= 1"),
    Case("config-distill-above-one", _cfg(distill=1.5), r"distill must be <= 1"),
    Case("config-lr-schedule-unknown", _cfg(lr_schedule="step"), r"lr_schedule must be one of"),
    Case("config-square-not-bool", _cfg(square="yes"), r"square must be True or False"),
    Case("config-resume-without-dir", _cfg(resume=True), r"resume=True needs checkpoint_dir"),
    Case("config-uniform-with-skips", _cfg(uniform=True, skip_layers=[0]), r"uniform=True needs every layer"),
    Case("config-uniform-with-global", _cfg(uniform=True, ranking="global"), r"uniform=True needs every layer"),
    Case("config-unknown-option", lambda p: PruneConfig.from_kwargs(ratoi=0.3), r"did you mean 'ratio'"),
    Case("config-not-a-config", lambda p: PruneConfig.from_kwargs({"ratio": 0.3}), r"must be a loraprune.PruneConfig",
         raises=TypeError),
]

# ---- issue 20: values that reach deep code or JSON, and options that contradict or do nothing ----
_np = __import__("numpy")

CASES += [
    # numbers from numpy: scalars are accepted as their Python value (tests/test_bad_inputs.py), arrays refused
    Case("config-numpy-ratio-array", _cfg(ratio=_np.array([0.3, 0.4])), r"ratio must be a finite number"),
    Case("config-numpy-steps-float", _cfg(steps=_np.float64(3.5)), r"steps must be an integer"),
    Case("config-numpy-ratio-nan", _cfg(ratio=_np.float32("nan")), r"ratio must be a finite number"),
    # wrong types
    Case("config-skip-layers-int", _cfg(skip_layers=1), r"skip_layers must be None, 'paper' or a list of layer indices"),
    Case("config-skip-layers-string", _cfg(skip_layers="0,1"), r"skip_layers must be .*list of layer indices"),
    Case("config-skip-layers-floats", _cfg(skip_layers=[0.5]), r"skip_layers must be .*list of layer indices"),
    Case("config-skip-layers-bools", _cfg(skip_layers=[True]), r"skip_layers must be .*list of layer indices"),
    Case("config-checkpoint-dir-int", _cfg(checkpoint_dir=5), r"checkpoint_dir must be a directory path"),
    Case("config-checkpoint-dir-blank", _cfg(checkpoint_dir=" "), r"checkpoint_dir must be a directory path"),
    # contradicting or no-op options
    Case("config-prune-start-after-end", _cfg(prune_start=0.8, prune_end=0.5), r"prune_start=0\.8 is not before prune_end"),
    Case("config-prune-start-equals-end", _cfg(steps=10, prune_start=5, prune_end=5), r"not before prune_end"),
    Case("config-prune-start-step-after-fraction", _cfg(steps=10, prune_start=9, prune_end=0.5), r"not before prune_end"),
    Case("config-prune-end-float-above-one", _cfg(prune_end=100.0), r"fraction of steps, and must be <= 1.*int \(100\)"),
    Case("config-prune-end-after-last-step", _cfg(steps=10, prune_end=20), r"prune_end=20 is after the last step"),
    Case("config-checkpoint-every-without-dir", _cfg(checkpoint_every=5), r"does nothing without checkpoint_dir"),
    Case("config-force-resume-without-resume", _cfg(force_resume=True, checkpoint_dir="x"),
         r"force_resume=True only applies with resume=True"),
    Case("config-uniform-override-contradicts-ranking",
         lambda p: PruneConfig.from_kwargs(PruneConfig(uniform=True), ranking="adaptive"),
         r"ranking='adaptive' contradicts uniform=True"),
    Case("config-ratio-given-twice", lambda p: PruneConfig.from_kwargs(0.3, ratio=0.5), r"ratio is given twice"),
]
