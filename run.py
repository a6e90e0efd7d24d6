"""Entry point: `python run.py method=chai model=llama7b task=piqa` (see README and conf/config.yaml)."""

import os
import sys

from chai.config import OFFLINE_ENV, check_overrides
from chai.errors import ChaiError

# huggingface_hub reads these once, when first imported: set them before anything imports it, or a model missing
# offline retries for a minute before its error. `offline: true` is the default; `offline=false` leaves them be.
if not any(arg.lstrip("+").lower() == "offline=false" for arg in sys.argv[1:]):
    os.environ.update(dict.fromkeys(OFFLINE_ENV, "1"))

import hydra  # noqa: E402
from hydra.core.hydra_config import HydraConfig  # noqa: E402
from hydra.types import RunMode  # noqa: E402

from chai.preflight import preflight  # noqa: E402


def fail(err: ChaiError) -> None:
    print(f"error: {err}", file=sys.stderr)
    sys.exit(2)


def record_failure(cfg, overrides: list[str], err: ChaiError) -> None:
    """A bad cell of a sweep is a recorded row with its error, as the runner records a failing cell; the sweep
    goes on."""
    from omegaconf import OmegaConf

    from chai.cli import runs_path
    from chai.records import append_jsonl, new_record

    record = new_record(OmegaConf.to_container(cfg, resolve=True), overrides, cfg.mode)
    record.update(error=f"ChaiError: {err}", results_path=str(runs_path(cfg)))
    append_jsonl(runs_path(cfg), record)
    print(f"failed (recorded): {record['error']}", file=sys.stderr)


@hydra.main(config_path="conf", config_name="config", version_base="1.3")
def main(cfg) -> None:
    hydra_cfg = HydraConfig.get()
    overrides, in_sweep = list(hydra_cfg.overrides.task), hydra_cfg.mode == RunMode.MULTIRUN
    try:
        preflight(cfg)  # before the resume check and before torch: bad input fails in one line, in seconds
    except ChaiError as err:
        if not in_sweep:
            fail(err)
        record_failure(cfg, overrides, err)
        return
    from chai.cli import run_mode  # torch, transformers, lm-eval: imported once the input is known good

    try:
        run_mode(cfg, overrides, in_sweep=in_sweep)
    except ChaiError as err:  # bad input: one line, not a traceback (the record already holds the error)
        fail(err)


if __name__ == "__main__":
    try:
        check_overrides(sys.argv[1:])
    except ChaiError as err:
        fail(err)
    main()
