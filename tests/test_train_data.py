"""train/data.py: rows -> (positions, labels, sources), the per-rank partition of each epoch, and the
refusals of broken shard directories. Shards are written here with pyarrow in prep's format, so every
corner (loss masks, full rows, corrupt files) is one line to set up."""

import hashlib
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from train.data import IGNORE, Loader, PackedShards, Row, row_arrays

PAD = 128004


def write_shards(out: Path, rows: list[list[tuple[list[int], int]]], seq_len: int, masks=None,
                 fingerprint: str = "sha256:test", rows_per_shard: int = 3, doc_lens=None) -> Path:
    """rows: for each packed sequence, its documents as (ids, source index). Writes prep's layout.
    doc_lens, when given, replaces the document lengths of each row (to write a corrupt one)."""
    out.mkdir(parents=True, exist_ok=True)
    fields = [pa.field("input_ids", pa.list_(pa.uint32(), seq_len)), pa.field("doc_lens", pa.list_(pa.uint32())),
              pa.field("doc_sources", pa.list_(pa.uint8()))]
    if masks is not None:
        fields.append(pa.field("loss_mask", pa.list_(pa.uint8(), seq_len)))
    schema, shards = pa.schema(fields), []
    for first in range(0, len(rows), rows_per_shard):
        chunk = rows[first:first + rows_per_shard]
        ids = np.full((len(chunk), seq_len), PAD, np.uint32)
        for r, docs in enumerate(chunk):
            flat = [t for doc, _ in docs for t in doc]
            ids[r, :len(flat)] = flat
        columns = [pa.FixedSizeListArray.from_arrays(pa.array(ids.ravel()), seq_len),
                   pa.array(doc_lens[first:first + rows_per_shard] if doc_lens else
                            [[len(doc) for doc, _ in docs] for docs in chunk], pa.list_(pa.uint32())),
                   pa.array([[s for _, s in docs] for docs in chunk], pa.list_(pa.uint8()))]
        if masks is not None:
            m = np.asarray(masks[first:first + rows_per_shard], np.uint8)
            columns.append(pa.FixedSizeListArray.from_arrays(pa.array(m.ravel()), seq_len))
        name = f"shard-{len(shards):05d}.arrow"
        with pa.OSFile(str(out / name), "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
            writer.write_batch(pa.RecordBatch.from_arrays(columns, schema=schema))
        shards.append({"file": name, "rows": len(chunk), "sha256": hashlib.sha256((out / name).read_bytes()).hexdigest()})
    manifest = {"format": "prep-shards", "format_version": 1, "seq_len": seq_len, "pad_id": PAD,
                "tokenizer": {"name": "HuggingFaceTB/SmolLM3-3B", "vocab_size": 128256, "fingerprint": fingerprint},
                "loss_mask": masks is not None, "sources": [{"name": "a"}, {"name": "b"}], "shards": shards,
                "counts": {"sequences": len(rows)}}
    (out / "manifest.json").write_text(json.dumps(manifest))
    return out


def row(docs, T, mask=None):
    flat = [t for d, _ in docs for t in d]
    ids = np.full(T, PAD, np.uint32)
    ids[:len(flat)] = flat
    return Row(ids, np.array([len(d) for d, _ in docs], np.uint32), np.array([s for _, s in docs], np.uint8),
               None if mask is None else np.asarray(mask, np.uint8))


def test_positions_restart_and_labels_stay_inside_each_document():
    ids, pos, labels, sources = row_arrays(row([([10, 11, 12], 0), ([20, 21], 1)], 8), 8)
    assert ids.tolist() == [10, 11, 12, 20, 21, PAD, PAD, PAD]
    assert pos.tolist() == [0, 1, 2, 0, 1, 0, 1, 2]  # padding restarts too: it never extends document 2
    assert labels.tolist() == [11, 12, IGNORE, 21, IGNORE, IGNORE, IGNORE, IGNORE]  # no 12 -> 20 target
    assert sources.tolist() == [0, 0, -1, 1, -1, -1, -1, -1]


def test_full_row_without_padding_and_one_token_documents():
    _, pos, labels, sources = row_arrays(row([([5], 0), ([6, 7, 8], 1), ([9], 0)], 5), 5)
    assert pos.tolist() == [0, 0, 1, 2, 0]
    assert labels.tolist() == [IGNORE, 7, 8, IGNORE, IGNORE]
    assert sources.tolist() == [-1, 1, 1, -1, -1]


def test_loss_mask_keeps_only_targets_that_get_loss():
    # token t+1 is the target of position t: it counts only where the mask of t+1 is 1
    mask = [0, 0, 1, 1, 0, 1, 0, 0]
    _, _, labels, sources = row_arrays(row([([1, 2, 3, 4], 0), ([5, 6], 1)], 8, mask), 8)
    assert labels.tolist() == [IGNORE, 3, 4, IGNORE, 6, IGNORE, IGNORE, IGNORE]
    assert sources.tolist() == [-1, 0, 0, -1, 1, -1, -1, -1]


def test_corrupt_doc_lens_are_refused_when_the_shards_are_opened(tmp_path):
    out = write_shards(tmp_path / "s", [[([1, 2, 3], 0), ([4], 1)]], 4, doc_lens=[[3, 3]])
    with pytest.raises(ValueError, match=r"row 0: doc_lens: sum\(doc_lens\) = 6 > seq_len 4"):
        PackedShards(str(out), verify_hashes=True)


def make_rows(n, T=8):
    return [[([100 + i] * 3, i % 2), ([200 + i] * 2, 1 - i % 2)] for i in range(n)]


def test_shards_memory_map_reads_back_what_was_written(tmp_path):
    rows = make_rows(7)
    shards = PackedShards(str(write_shards(tmp_path / "s", rows, 8)))
    assert len(shards) == 7 and shards.seq_len == 8 and shards.source_names == ["a", "b"]
    for i, docs in enumerate(rows):
        got = shards[i]
        assert got.input_ids[:5].tolist() == [100 + i] * 3 + [200 + i] * 2
        assert got.doc_lens.tolist() == [3, 2] and got.doc_sources.tolist() == [i % 2, 1 - i % 2]
        assert not got.input_ids.flags.owndata  # a view into the memory map, not a copy


def test_every_row_once_per_epoch_across_ranks_and_micro_batches(tmp_path):
    shards = PackedShards(str(write_shards(tmp_path / "s", make_rows(11), 8)))
    world, accum, batch = 2, 2, 2  # 8 rows per step: 2 steps per epoch, the last with 5 empty slots
    loaders = [Loader(shards, batch, accum, rank, world, seed=3) for rank in range(world)]
    assert loaders[0].steps_per_epoch == 2
    orders = []
    for epoch in range(2):
        seen = []
        for step in range(epoch * 2, epoch * 2 + 2):
            per_rank = [sum(ld.rows_of_step(step), []) for ld in loaders]
            assert not set(per_rank[0]) & set(per_rank[1]) - {-1}  # ranks never share a row
            seen += per_rank[0] + per_rank[1]
        real = [i for i in seen if i >= 0]
        assert sorted(real) == list(range(11)) and seen.count(-1) == 5  # none skipped, none repeated
        orders.append(real)
    assert orders[0] != orders[1]  # a new permutation per epoch
    again = Loader(shards, batch, accum, 0, world, seed=3)
    assert again.rows_of_step(1) == loaders[0].rows_of_step(1)  # position = f(step): exact resume


def test_empty_slots_carry_no_targets_and_counts_are_per_source(tmp_path):
    shards = PackedShards(str(write_shards(tmp_path / "s", make_rows(3), 8)))
    loader = Loader(shards, batch_size=2, grad_accum=1, rank=0, world_size=1, seed=0)
    batches = loader.next() + loader.next()  # 3 rows in 2 steps of 2: one empty slot
    assert [tuple(b.input_ids.shape) for b in batches] == [(2, 8), (2, 8)]
    assert sum(b.num_targets for b in batches) == 3 * (2 + 1)  # per row: 3-token doc -> 2, 2-token doc -> 1
    assert sum(b.num_tokens for b in batches) == 15 and sum(b.doc_len_sq for b in batches) == 3 * (9 + 4)
    assert sum(b.source_targets for b in batches).tolist() == [2 + 1 + 2, 1 + 2 + 1]  # rows 0-2, sources a, b
    loader.load_state_dict(loader.state_dict())
    with pytest.raises(ValueError, match="must match to resume"):
        loader.load_state_dict({**loader.state_dict(), "rows_per_step": 4})


def test_token_ids_beyond_the_model_vocabulary_are_refused(tmp_path):
    # the manifest's vocab_size is the model's (train.model.check_vocab); the ids are checked against it at open
    out = write_shards(tmp_path / "s", [[([5, 130000], 0)]], 4)
    with pytest.raises(ValueError, match="130,000 at position 1 is beyond the vocabulary"):
        PackedShards(str(out), verify_hashes=True)


def test_each_rank_proves_its_share_of_the_shards_and_no_verify_trusts_them(tmp_path):
    rows = make_rows(6)
    rows[4][0] = ([130000] * 3, 0)  # row 1 of shard 1: only the rank that proves shard 1 can see it
    out = write_shards(tmp_path / "s", rows, 8)
    PackedShards(str(out), verify_hashes=True, rank=0, world_size=2)  # proves shard 0 only
    with pytest.raises(ValueError, match="shard-00001.arrow row 1: ids:"):
        PackedShards(str(out), verify_hashes=True, rank=1, world_size=2)
    shards = PackedShards(str(out), verify_hashes=False)  # --no-verify-hashes: the rows are trusted
    assert shards[4].input_ids[0] == 130000


def test_loss_mask_column_is_read(tmp_path):
    rows = [[([1, 2, 3, 4], 0)]]
    shards = PackedShards(str(write_shards(tmp_path / "s", rows, 6, masks=[[0, 0, 1, 1, 0, 0]])))
    batch = Loader(shards, 1, 1, 0, 1, seed=0).next()[0]
    assert batch.labels[0].tolist() == [IGNORE, 3, 4, IGNORE, IGNORE, IGNORE]


@pytest.mark.parametrize("damage, message", [
    ("no_manifest", "no manifest.json"),
    ("rows", "rows but the manifest says"),
    ("escape", "outside the directory"),
    ("missing", "missing: listed in the manifest but not in"),
    ("flip", "sha256: .* the file changed after the build"),
    ("seq_len", "don't match the manifest"),
    ("foreign", "written by another build"),
])
def test_broken_shard_directories_are_refused_before_training(tmp_path, damage, message):
    out = write_shards(tmp_path / "s", make_rows(5), 8)
    manifest = json.loads((out / "manifest.json").read_text())
    if damage == "no_manifest":
        (out / "manifest.json").unlink()
    elif damage == "rows":
        manifest["shards"][0]["rows"] = 4
    elif damage == "escape":
        manifest["shards"][0]["file"] = "../shard-00000.arrow"
    elif damage == "missing":
        (out / "shard-00001.arrow").unlink()
    elif damage == "flip":
        data = bytearray((out / "shard-00000.arrow").read_bytes())
        data[-100] ^= 1
        (out / "shard-00000.arrow").write_bytes(bytes(data))
    elif damage == "seq_len":
        manifest["seq_len"] = 16
    elif damage == "foreign":  # this manifest's build id is not the one in the shard's schema
        manifest["build_id"] = "sha256:" + "0" * 64
    if damage != "no_manifest":
        (out / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=message):
        PackedShards(str(out), verify_hashes=True)
