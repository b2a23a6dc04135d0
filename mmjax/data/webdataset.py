"""Webdataset tar shards as a random-access source for grain.

A webdataset shard is a tar file whose members are grouped into samples by
their key: `dir/00042.jpg`, `dir/00042.txt` and `dir/00042.json` are the
`jpg`, `txt` and `json` fields of sample `dir/00042` (the key is the member's
path up to the first dot of its file name). This is img2dataset's output, the
layout LAION, DataComp and CC12M are distributed in.

grain needs random access: each shard gets an index of its samples (the byte
offset and size of every field), built once by reading the tar headers and
cached in a folder (`~/.cache/mmjax/webdataset`, or `cache_dir`) under a name
made from the shard's URL, size and modification time. A sample is then one seek and one read,
so the pipeline keeps its global shuffle, per-process shards and exact resume.
Shards are local paths or fsspec URLs (`gs://...` with gcsfs, `s3://...` with
s3fs, `memory://...`); `{00000..00999}` and `{a,b}` patterns expand as
webdataset writes them.

A sample whose image is missing or does not decode, or whose caption is
missing, is marked `bad`: the pipeline skips it and `num_bad` counts it. A
shard that cannot be opened or is not a tar file is an error naming it.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
import tarfile
import threading
from typing import Any, Sequence

from mmjax.data import transforms
from mmjax.data.builders import encode_png

log = logging.getLogger(__name__)

INDEX_VERSION = 1
_BRACE = re.compile(r"\{([^{}]*)\}")


def expand_urls(pattern: str | Sequence[str]) -> list[str]:
  """Shard URLs of a pattern: `{00000..00099}` (zero padding kept), `{a,b}`,
  several groups, and `::` or whitespace between several patterns; a local
  folder stands for its .tar files. A list of patterns expands each in turn."""
  if not isinstance(pattern, str):
    return [u for p in pattern for u in expand_urls(p)]
  if "://" not in pattern and "{" not in pattern and os.path.isdir(pattern):
    return sorted(os.path.join(pattern, n) for n in os.listdir(pattern) if n.endswith(".tar"))
  parts = [p for p in re.split(r"::|\s+", pattern.strip()) if p]
  if len(parts) > 1:
    return expand_urls(parts)
  m = _BRACE.search(pattern)
  if not m:
    return [pattern] if pattern else []
  head, body, tail = pattern[:m.start()], m.group(1), pattern[m.end():]
  r = re.fullmatch(r"(\d+)\.\.(\d+)", body)
  if r:
    lo, hi = r.group(1), r.group(2)
    if int(hi) < int(lo):
      raise ValueError(f"shard pattern {pattern!r}: range {body!r} runs backwards")
    width = len(lo) if lo.startswith("0") or len(lo) == len(hi) else 0
    choices = [str(i).zfill(width) for i in range(int(lo), int(hi) + 1)]
  else:
    choices = body.split(",")
  return [u for c in choices for u in expand_urls(head + c + tail)]


def sample_key(name: str) -> tuple[str, str] | None:
  """(key, field) of a tar member name, webdataset's way: `a/b/00042.seg.png`
  is field `seg.png` of sample `a/b/00042`. None for names without a field."""
  directory, base = os.path.split(name)
  if "." not in base or base.startswith("."):
    return None
  stem, field = base.split(".", 1)
  return (f"{directory}/{stem}" if directory else stem), field.lower()


def _open(url: str, mode: str = "rb"):
  if "://" not in url:
    return open(url, mode)
  import fsspec
  return fsspec.open(url, mode).open()


def _fingerprint(url: str) -> str:
  """What changes when a shard is rewritten: its size and modification time
  (or the store's etag / generation), as the file system reports them."""
  if "://" not in url:
    st = os.stat(url)
    return f"{st.st_size}:{st.st_mtime_ns}"
  import fsspec
  fs, path = fsspec.core.url_to_fs(url)
  info = fs.info(path)
  stamp = next((info[k] for k in ("etag", "ETag", "generation", "mtime", "LastModified",
                                  "updated", "created") if info.get(k) is not None), "")
  return f"{info.get('size')}:{stamp}"


def index_shard(url: str) -> list[tuple[str, dict[str, tuple[int, int]]]]:
  """[(key, {field: (offset, size)})] of a shard, in tar order, from its headers."""
  samples: dict[str, dict[str, tuple[int, int]]] = {}
  try:
    with _open(url) as f, tarfile.open(fileobj=f, mode="r:") as tar:
      for member in tar:
        if not member.isfile():
          continue
        ks = sample_key(member.name)
        if ks is None:
          continue
        samples.setdefault(ks[0], {})[ks[1]] = (member.offset_data, member.size)
  except (OSError, tarfile.TarError) as e:
    raise ValueError(f"webdataset shard {url} cannot be read as a tar file: "
                     f"{type(e).__name__}: {e}") from e
  return list(samples.items())


def default_cache_dir() -> str:
  return os.environ.get("MMJAX_WDS_CACHE") or os.path.expanduser("~/.cache/mmjax/webdataset")


def cached_index(url: str, cache_dir: str | None = None):
  """`index_shard(url)`, read from the cache folder when an index of this URL in
  its current version (`_fingerprint`) is there, else built and written there."""
  stamp = _fingerprint(url)
  folder = cache_dir or default_cache_dir()
  name = hashlib.sha1(f"{url}\0{stamp}".encode()).hexdigest()[:20] + ".json"
  path = os.path.join(folder, name)
  try:
    with open(path) as f:
      cached = json.load(f)
    if cached.get("version") == INDEX_VERSION and cached.get("url") == url:
      return [(k, {f: tuple(v) for f, v in fields.items()}) for k, fields in cached["samples"]]
  except (OSError, ValueError, KeyError):
    pass
  samples = index_shard(url)
  try:
    os.makedirs(folder, exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
      json.dump({"version": INDEX_VERSION, "url": url, "version_of_shard": stamp,
                 "samples": samples}, f)
    os.replace(tmp, path)
  except OSError as e:  # a read-only cache is slower, not wrong
    log.warning("could not cache the index of %s in %s: %s", url, folder, e)
  return samples


class WebDatasetSource:
  """The samples of webdataset shards, as the example dicts of `sources`.

  `image_key` and `text_key` name a sample's fields; `;` separates
  alternatives (`jpg;png;webp`), the first present wins. `json:NAME` reads a
  key of the sample's JSON instead (`json:captions`, a list: one is drawn per
  epoch). `label_key` (optional) is a field holding an integer, or `json:NAME`.
  """

  may_skip = True  # samples without an image or caption, or whose image does not decode

  def __init__(self, urls: str | Sequence[str], *, image_key: str = "jpg;png;jpeg;webp",
               text_key: str = "txt", label_key: str | None = None,
               cache_dir: str | None = None, progress: bool = True):
    self.urls = expand_urls(urls)
    if not self.urls:
      raise ValueError(f"no webdataset shards in {urls!r} (set data.urls)")
    self.image_keys = [k.strip().lower() for k in image_key.split(";") if k.strip()]
    self.text_keys = [k.strip() for k in text_key.split(";") if k.strip()]
    self.label_key = label_key
    shards = self.urls
    if progress and len(shards) > 1:
      from tqdm import tqdm
      shards = tqdm(shards, desc="indexing shards", unit="shard", leave=False)
    self._samples: list[tuple[int, dict[str, tuple[int, int]]]] = []
    self._keys: list[str] = []
    for i, url in enumerate(shards):
      for key, fields in cached_index(url, cache_dir):
        self._samples.append((i, fields))
        self._keys.append(key)
    if not self._samples:
      raise ValueError(f"the webdataset shards {self.urls[:3]}... hold no samples")
    self._lock = threading.Lock()
    self._local = threading.local()
    self.num_bad = 0

  def __len__(self) -> int:
    return len(self._samples)

  def _read(self, shard: int, span: tuple[int, int]) -> bytes:
    handles = getattr(self._local, "handles", None)
    if handles is None or getattr(self._local, "pid", None) != os.getpid():
      handles = self._local.handles = {}
      self._local.pid = os.getpid()
    f = handles.get(shard)
    if f is None:
      f = handles[shard] = _open(self.urls[shard])
    f.seek(span[0])
    return f.read(span[1])

  def _field(self, fields: dict, names: list[str]) -> str | None:
    return next((n for n in names if n in fields), None)

  def __getitem__(self, index: int) -> dict[str, Any]:
    shard, fields = self._samples[int(index)]
    key = self._keys[int(index)]
    example = {"id": key, "image": None, "captions": [""], "label": -1, "num_objects": 0,
               "bad": False}
    memo: dict = {}  # the sample's JSON, read once if a key needs it
    problem = None
    image_field = self._field(fields, self.image_keys)
    captions = self._captions(shard, fields, memo)
    if image_field is None:
      problem = f"no {'/'.join(self.image_keys)} field"
    elif not captions:
      problem = f"no caption ({';'.join(self.text_keys)})"
    else:
      try:
        example["image"] = transforms.decode(self._read(shard, fields[image_field]))
      except Exception as e:  # any undecodable image
        problem = f"{image_field} does not decode ({type(e).__name__}: {e})"
      example["captions"] = captions
      if self.label_key:
        example["label"] = self._label(shard, fields, memo)
      if "json" in fields:
        example["num_objects"] = int(self._json(shard, fields, memo).get("num_objects", 0))
    if problem:
      example["bad"], example["image"] = True, None
      with self._lock:
        self.num_bad += 1
        count = self.num_bad
      log.warning("skipping sample %s of %s: %s; %d skipped so far", key,
                  self.urls[shard], problem, count)
    return example

  def _captions(self, shard: int, fields: dict, memo: dict) -> list[str]:
    """The first text field present: a plain-text field, or `json:NAME` (a string
    or a list of strings in the sample's JSON). Empty captions do not count."""
    for name in self.text_keys:
      if name.startswith("json:"):
        if "json" not in fields:
          continue
        value = self._json(shard, fields, memo).get(name[5:])
        texts = [value] if isinstance(value, str) else list(value or [])
      elif name in fields:
        texts = [self._read(shard, fields[name]).decode("utf-8", "replace")]
      else:
        continue
      texts = [str(t).strip() for t in texts if str(t).strip()]
      if texts:
        return texts
    return []

  def _json(self, shard: int, fields: dict, memo: dict) -> dict:
    if "json" not in memo:
      memo["json"] = json.loads(self._read(shard, fields["json"]))
    return memo["json"]

  def _label(self, shard: int, fields: dict, memo: dict) -> int:
    if self.label_key.startswith("json:"):
      if "json" not in fields:
        return -1
      return int(self._json(shard, fields, memo).get(self.label_key[5:], -1))
    if self.label_key not in fields:
      return -1
    return int(self._read(shard, fields[self.label_key]).decode().strip())

  def __getstate__(self):
    state = dict(self.__dict__)
    del state["_lock"], state["_local"]
    return state

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._lock, self._local = threading.Lock(), threading.local()

  def __repr__(self) -> str:
    return f"WebDatasetSource({len(self.urls)} shards, {len(self)} samples)"


def write_shards(samples, out_dir: str, *, samples_per_shard: int = 10000,
                 prefix: str = "") -> list[str]:
  """Writes (key, {field: bytes}) pairs as img2dataset-layout shards
  `OUT/PREFIX00000.tar`, ...; returns their paths."""
  os.makedirs(out_dir, exist_ok=True)
  paths, tar, count = [], None, 0
  try:
    for key, fields in samples:
      if tar is None or count == samples_per_shard:
        if tar is not None:
          tar.close()
        paths.append(os.path.join(out_dir, f"{prefix}{len(paths):05d}.tar"))
        tar, count = tarfile.open(paths[-1], "w"), 0
      for field, data in fields.items():
        info = tarfile.TarInfo(f"{key}.{field}")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
      count += 1
  finally:
    if tar is not None:
      tar.close()
  return paths


def source_samples(source, *, progress: bool = True):
  """(key, fields) of every usable example of a `sources` source: `png`, `txt`
  (the first caption) and `json` (all captions, label, id)."""
  indices = range(len(source))
  if progress:
    from tqdm import tqdm
    indices = tqdm(indices, desc="writing shards", unit="example")
  for i in indices:
    ex = source[i]
    if ex["bad"] or ex["image"] is None:
      continue
    meta = {"captions": list(ex["captions"]), "label": int(ex["label"]),
            "num_objects": int(ex.get("num_objects", 0)), "id": str(ex.get("id", i))}
    yield f"{i:09d}", {"png": encode_png(ex["image"]), "txt": ex["captions"][0].encode(),
                       "json": json.dumps(meta).encode()}
