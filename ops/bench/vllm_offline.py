"""`python -m ops.bench.vllm_offline TIMING.json REPEAT INPUT.jsonl <vLLM arguments>`:
the chat lines of a batch file through vLLM's offline engine (`LLM.chat`, every line at
once), the generation timed apart from the engine's start-up, REPEAT times.

The arguments are a millrace worker's for the model (`engine_args.argv`), read by vLLM's
own parser: the engine is configured exactly as the pipeline's.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import fields
from pathlib import Path


def main() -> None:
    from vllm import LLM, SamplingParams
    from vllm.engine.arg_utils import EngineArgs
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    timing, repeat, source = Path(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3])
    parser = make_arg_parser(FlexibleArgumentParser())  # type: ignore[no-untyped-call]
    given, defaults = vars(parser.parse_args(sys.argv[4:])), vars(parser.parse_args([]))
    engine = {f.name for f in fields(EngineArgs)}
    # the engine arguments given (the serving layer's, e.g. a tool parser, mean nothing here)
    llm = LLM(**{k: v for k, v in given.items() if k in engine and v != defaults.get(k)})
    bodies = [json.loads(line)["body"] for line in source.read_text().splitlines() if line]
    params = [SamplingParams(max_tokens=b.get("max_tokens"), temperature=b.get("temperature"))
              for b in bodies]
    spent = []
    for _ in range(repeat):
        started = time.perf_counter()
        outputs = llm.chat([b["messages"] for b in bodies], params, use_tqdm=False)
        spent.append(time.perf_counter() - started)
    tokens = sum(len(c.token_ids) for out in outputs for c in out.outputs)
    timing.write_text(json.dumps({"batch_s": spent, "lines": len(bodies),
                                  "output_tokens": tokens}))


if __name__ == "__main__":
    main()
