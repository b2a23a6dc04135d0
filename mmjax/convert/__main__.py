"""python -m mmjax.convert --src=HF_DIR --out=WORKDIR                 # HF -> mmjax
   python -m mmjax.convert --to=hf --src=WORKDIR --out=HF_DIR [--dtype=bfloat16] [--verify]

A CLIP trained here exports with its tokenizer (tokenizer.json) and image
preprocessing (preprocessor_config.json); --verify then loads the folder in
transformers and compares it with mmjax on the workdir's evaluation split.
What transformers cannot hold (a conv stem, attention pooling, the sigmoid
loss's bias) is refused before anything is written, naming the config keys.

Supported: transformers' CLIPModel, LlamaForCausalLM and
LlavaForConditionalGeneration folders (config.json, model.safetensors or a
sharded index, tokenizer files). Fine-tune a converted workdir with an
experiment config whose model.* (and data.tokenizer, image_size,
context_length) match its config.json, starting from its params with
`--config.init.clip_workdir=WORKDIR` (CLIP), `init.lm_workdir` (a Llama as the
LLM of LLaVA) or `init.stage1_workdir` (a LLaVA).
"""

import sys

from absl import app, flags

from mmjax import cli, convert, parallel
from mmjax.convert.mapping import ConversionError

_SRC = flags.DEFINE_string("src", None, "HF model folder (import) or mmjax workdir (--to=hf)")
_OUT = flags.DEFINE_string("out", None, "the workdir (import) or HF folder (--to=hf) to write")
_TO = flags.DEFINE_enum("to", "mmjax", ["mmjax", "hf"], "conversion direction")
_DTYPE = flags.DEFINE_enum("dtype", None, ["float32", "bfloat16", "float16"],
                           "--to=hf: tensor dtype (default: the imported checkpoint's, "
                           "else float32)")
_VERIFY = flags.DEFINE_bool("verify", False,
                            "--to=hf, a CLIP: load the export in transformers and compare its "
                            "embeddings and zero-shot top-1 with mmjax's on the eval split")
_STEP = flags.DEFINE_integer("step", None, "--to=hf: checkpoint step (default: the latest)")
_FSDP = flags.DEFINE_integer("fsdp", -1, "import: devices the params are sharded over (-1: all)")
_TENSOR = flags.DEFINE_integer("tensor", 1, "import: tensor-parallel devices")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  cli.init_process()
  try:
    _convert()
  except (ConversionError, FileExistsError, FileNotFoundError) as e:
    sys.exit(f"mmjax.convert: {e}")


def _convert():
  if _TO.value == "hf":
    hf_config = convert.export_hf(_SRC.value, _OUT.value, dtype=_DTYPE.value, step=_STEP.value)
    print(f"wrote {hf_config['architectures'][0]} to {_OUT.value}")
    if _VERIFY.value:
      if hf_config["architectures"][0] != "CLIPModel":
        raise app.UsageError("--verify checks CLIP exports only")
      from mmjax.convert import verify
      print(verify.report(verify.verify_clip(_SRC.value, _OUT.value, step=_STEP.value)))
    return
  data = -1 if _FSDP.value != -1 else 1
  mesh = parallel.make_mesh({"data": data, "fsdp": _FSDP.value, "tensor": _TENSOR.value})
  config = convert.import_hf(_SRC.value, _OUT.value, mesh=mesh)
  print(f"wrote {config.source.architecture} ({config.task}) to {_OUT.value}")


if __name__ == "__main__":
  flags.mark_flags_as_required(["src", "out"])
  app.run(main)
