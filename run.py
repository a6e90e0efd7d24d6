"""Entry point: `python run.py method=chai model=llama7b task=piqa` (see README and conf/config.yaml)."""

import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode

from chai.cli import run_mode
from chai.config import check_overrides
from chai.errors import ChaiError


def fail(err: ChaiError) -> None:
    print(f"error: {err}", file=sys.stderr)
    sys.exit(2)


@hydra.main(config_path="conf", config_name="config", version_base="1.3")
def main(cfg) -> None:
    hydra_cfg = HydraConfig.get()
    try:
        run_mode(cfg, list(hydra_cfg.overrides.task), in_sweep=hydra_cfg.mode == RunMode.MULTIRUN)
    except ChaiError as err:  # bad input: one line, not a traceback (the record already holds the error)
        fail(err)


if __name__ == "__main__":
    try:
        check_overrides(sys.argv[1:])
    except ChaiError as err:
        fail(err)
    main()
