"""``python -m engram.evaluation ARGS``: lm-eval's command line (``lm_eval ARGS``) with the ``engram``
model registered, e.g. ``python -m engram.evaluation run --model engram --model_args checkpoint=RUN
--tasks engram_ppl --include_path "$(python -c 'import engram.evaluation as e; print(e.TASKS_DIR)')"``."""

from __future__ import annotations

import engram  # noqa: F401 - lets transformers' Auto classes find saved EngramForCausalLM directories (model hf)
import engram.evaluation.harness  # noqa: F401 - registers the lm-eval model "engram"
from lm_eval.__main__ import cli_evaluate

if __name__ == "__main__":
    cli_evaluate()
