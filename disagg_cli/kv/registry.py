"""The KV codec registry: each codec by its `--kv-codec` name, and decoding any codec's output.

Apart from `kv/codec.py` (the codec base and the lossless codecs) and `kv/quant.py` (the lossy
ones, which subclass that base) so neither imports the other's registry.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from disagg_cli.errors import UsageError
from disagg_cli.kv.codec import AutoCodec, KVCodec, LZ4Codec, NoneCodec, ShuffleLZ4Codec
from disagg_cli.kv.quant import Int4Codec, Int8Codec
from disagg_cli.protocol import CODEC_NAMES, Frame, KVMeta, WireError

_CLASSES: dict[str, type[KVCodec]] = {
    c.name: c for c in (NoneCodec, LZ4Codec, ShuffleLZ4Codec, AutoCodec, Int8Codec, Int4Codec)}
assert tuple(_CLASSES) == CODEC_NAMES, (tuple(_CLASSES), CODEC_NAMES)


def get_codec(name: str, *, link_bytes_per_s: float | None = None) -> KVCodec:
    """The codec called `name` (`--kv-codec`); `link_bytes_per_s` informs `auto` only."""
    cls = _CLASSES.get(name)
    if cls is None:
        raise UsageError(f"unknown KV codec {name!r}; choose one of: {', '.join(CODEC_NAMES)}")
    if cls is AutoCodec:
        return AutoCodec(link_bytes_per_s=link_bytes_per_s)
    return cls()


def decode_kv(meta: KVMeta, payloads: Sequence[Frame]) -> tuple[Tensor, Tensor]:
    """(k, v) from any codec's output; the receiver needs only the metadata, not the sender's codec."""
    cls = _CLASSES.get(meta.codec)
    if cls is None:
        raise WireError("bad-field", f"unknown codec {meta.codec!r}; known: {', '.join(CODEC_NAMES)}")
    return cls().decode(meta, payloads)
