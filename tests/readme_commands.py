"""Run `lit-optim` command lines in one process, one after another, as `lit-optim` runs them (`lit_optim.cli.main`).

    python tests/readme_commands.py '[["list"], ["train", "trainer.max_steps=2"]]'

One process for all of them costs one start-up of torch, Lightning and W&B instead of one each (Hydra's own multirun
runs its jobs the same way). Before each command it prints ``@@ <index>``; after it, ``RESULT {"index": ...,
"status": ..., "seconds": ...}``: the status is main()'s return value or exit status, or "exception".
"""

from __future__ import annotations

import json
import sys
import time
import traceback


def run(argv: list[str]) -> int | str:
    from lit_optim.cli import main

    try:
        return main(list(argv))
    except SystemExit as exc:  # Hydra and lit-optim report failures by exiting
        return exc.code if isinstance(exc.code, int) else 1
    except Exception:  # noqa: BLE001 - reported, and the next command still runs
        traceback.print_exc()
        return "exception"


if __name__ == "__main__":
    for index, argv in enumerate(json.loads(sys.argv[1])):
        print(f"@@ {index}", flush=True)
        start = time.perf_counter()
        status = run(argv)
        print("RESULT " + json.dumps({"index": index, "status": status,
                                      "seconds": round(time.perf_counter() - start, 1)}), flush=True)
