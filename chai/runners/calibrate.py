"""mode=calibrate: make a model's calibration artifact (chai.calibration) and record where it went."""

from chai.calibration import artifact_path, calibrate, save, settings_of
from chai.runners.setup import setup


def run(cfg, record: dict) -> dict:
    """Compute and save the artifact; the record keeps only its path and the chosen counts."""
    settings = settings_of(cfg.calibration)  # bad settings fail before the model loads
    ready = setup(cfg, with_method=False)
    artifact = calibrate(ready.model, ready.tokenizer, settings, cfg.data_dir, cfg.model.name, cfg.model.get("hf_id"))
    path = save(artifact, artifact_path(cfg.results_dir, cfg.model.name))
    return {  # what the run's summary shows (chai.cli.summarize)
        "calibration": {"path": str(path), "chosen": artifact["elbow"]["chosen"], "n_docs": artifact["n_docs"]},
        "timing": {"wall_s": artifact["time_s"]},
    }
