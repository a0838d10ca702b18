"""Coverage-guided fuzzing of one target of targets.py with atheris (libFuzzer).

    python tests/fuzz/run_fuzz.py TARGET [libFuzzer flags, e.g. -max_total_time=600]

Seeds come from tests/fuzz/corpus/TARGET (read only); new inputs go to a
scratch folder (or the folder given with --new-corpus), crashes to
--artifacts (default: the current folder). Only MixtralError may escape a
target; anything else is a finding, and libFuzzer stops with the input that
caused it. Keep each fixed finding in tests/fuzz/corpus/TARGET so that
tests/test_fuzz.py replays it.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

import atheris

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

with atheris.instrument_imports(include=["mixtral_ext", "targets"]):
    import targets


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("target", choices=sorted(targets.TARGETS))
    parser.add_argument("--new-corpus", default=None, help="where libFuzzer writes new inputs")
    parser.add_argument("--artifacts", default=".", help="where libFuzzer writes a crashing input")
    args, libfuzzer_flags = parser.parse_known_args()
    target = targets.TARGETS[args.target]
    new_corpus = args.new_corpus or tempfile.mkdtemp(prefix=f"fuzz_{args.target}_")
    os.makedirs(new_corpus, exist_ok=True)
    seeds = os.path.join(HERE, "corpus", args.target)
    argv = [sys.argv[0], *libfuzzer_flags, f"-artifact_prefix={os.path.join(args.artifacts, '')}", new_corpus, seeds]
    atheris.Setup(argv, target)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
