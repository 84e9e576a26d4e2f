#!/usr/bin/env python3
"""Batch inference at cluster scale on Ray Data: one t5rt.Model per actor, the dataset
streamed through `map_batches`.

    pip install ./crates/t5rt-py "ray[data]"
    python examples/ray_batch.py --input data.jsonl --output out/ [--model ./flan-t5-small]

Input: JSONL (one object per line) or Parquet (a file or a directory), with a text column
(`--column`, default `text`); every other column is carried through. Output: the same rows with
a `generated` column, as JSONL files (or Parquet with `--format parquet`) in the output
directory. On a laptop Ray starts a local instance; on a cluster, start Ray there
(`ray start --head` on one node, `ray start --address=HEAD:6379` on the others) and run this
script on any node (or pass `--address`): the actors spread over the nodes. Each actor uses
`--threads` CPU threads (`num_cpus` per actor), so `--actors` x `--threads` should match the
cores you give the job.
"""

import argparse
import os


class T5Predictor:
    """A Ray Data callable class: loads the model once per actor, generates per batch."""

    def __init__(self, model=None, dtype="f32", threads=1, column="text", gen_kwargs=None):
        import t5rt

        self.model = t5rt.Model(model, dtype=dtype, threads=threads)
        self.column = column
        self.gen_kwargs = gen_kwargs or {}

    def __call__(self, batch):
        texts = [str(t) for t in batch[self.column]]
        batch["generated"] = self.model.generate(texts, **self.gen_kwargs)
        return batch


def run(input_path, output_path, model=None, dtype="f32", actors=2, threads=1, batch_size=64,
        column="text", fmt="json", address=None, gen_kwargs=None):
    import ray

    if not ray.is_initialized():
        if address is None and "RAY_ADDRESS" not in os.environ:
            # A local instance: one logical CPU per actor thread and one more for Ray Data's
            # read and write tasks (with exactly the cores, the actors would hold them all
            # and the reads would wait for ever).
            ray.init(num_cpus=max(os.cpu_count() or 1, actors * threads + 1),
                     include_dashboard=False, log_to_driver=False)
        else:
            ray.init(address=address, include_dashboard=False, log_to_driver=False)
    if __name__ != "__main__":
        # Imported (not run as a script): ship this module's classes to the actors by value,
        # so they need not find this file on their import path.
        import sys
        from ray import cloudpickle
        cloudpickle.register_pickle_by_value(sys.modules[__name__])
    if str(input_path).endswith(".parquet") or fmt == "parquet-in":
        ds = ray.data.read_parquet(str(input_path))
    else:
        ds = ray.data.read_json(str(input_path), lines=True)
    kwargs = dict(
        fn_constructor_kwargs=dict(model=model, dtype=dtype, threads=threads, column=column,
                                   gen_kwargs=gen_kwargs),
        batch_size=batch_size,
        num_cpus=threads,
        batch_format="numpy",
    )
    try:  # Ray >= 2.9: `concurrency` sizes the actor pool
        ds = ds.map_batches(T5Predictor, concurrency=actors, **kwargs)
    except TypeError:  # older Ray
        ds = ds.map_batches(T5Predictor, compute=ray.data.ActorPoolStrategy(size=actors), **kwargs)
    if fmt == "parquet":
        ds.write_parquet(str(output_path))
    else:
        ds.write_json(str(output_path))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--input", required=True, help="JSONL file, or Parquet file/directory")
    ap.add_argument("--output", required=True, help="output directory")
    ap.add_argument("--model", default=None, help="checkpoint directory (default: the bundled model)")
    ap.add_argument("--dtype", default="f32", choices=["f32", "bf16", "int8"])
    ap.add_argument("--actors", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1, help="CPU threads per actor")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--column", default="text")
    ap.add_argument("--format", default="json", choices=["json", "parquet"])
    ap.add_argument("--address", default=None, help="Ray cluster address (default: local or RAY_ADDRESS)")
    ap.add_argument("--max-new-tokens", type=int, default=None)
    ap.add_argument("--num-beams", type=int, default=1)
    args = ap.parse_args()
    gen = {"num_beams": args.num_beams}
    if args.max_new_tokens:
        gen["max_new_tokens"] = args.max_new_tokens
    run(args.input, args.output, args.model, args.dtype, args.actors, args.threads,
        args.batch_size, args.column, args.format, args.address, gen)


if __name__ == "__main__":
    main()
