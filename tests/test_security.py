"""Nothing we ship deserialises pickles or runs remote code by default; manifests can't point outside their directory
or make a reader open a file twice."""

import json
import re
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CODE = sorted([*ROOT.glob("prep/*.py"), *ROOT.glob("train/*.py")])
FORBIDDEN = [
    (r"^\s*(import|from) (pickle|cPickle|dill|joblib)\b", "imports a pickle library"),
    (r"allow_pickle\s*=\s*True", "np.load with allow_pickle=True"),
    (r"weights_only\s*=\s*False", "torch.load with weights_only=False"),
    (r"trust_remote_code\s*=\s*True", "trust_remote_code hard-wired on"),
    (r"\bpd\.read_pickle|\.to_pickle\(", "pandas pickles"),
]


@pytest.mark.parametrize("path", CODE, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_pickle_or_remote_code(path):
    text = path.read_text()
    for pattern, what in FORBIDDEN:
        assert not re.search(pattern, text, re.M), f"{path.name} {what}"
    for call in re.finditer(r"torch\.load\(([^)]*)\)", text):
        assert "weights_only=True" in call.group(1), f"{path.name}: torch.load without weights_only=True"
    for call in re.finditer(r"np\.load\(([^)]*)\)", text):
        assert "allow_pickle=False" in call.group(1), f"{path.name}: np.load without allow_pickle=False"


def test_code_was_found():
    assert any(p.parent.name == "prep" for p in CODE) and any(p.parent.name == "train" for p in CODE)


@pytest.fixture(scope="module")
def built(tmp_path_factory, corpus):
    from prep.build import BuildConfig, build

    out = tmp_path_factory.mktemp("sec") / "out"
    build(BuildConfig(mix="a=1", sources={"a": corpus["a"]}, out=str(out), seq_len=1024, progress=False),
          log=lambda m: None)
    return out


@pytest.mark.parametrize("name", ["../shard-00000.arrow", "/etc/passwd", "sub/shard-00000.arrow", ".."])
def test_manifest_paths_cannot_leave_the_directory(built, tmp_path, name):
    from prep.inspection import inspect
    from prep.verify import verify
    from train.data import PackedShards

    out = Path(shutil.copytree(built, tmp_path / "copy"))
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["shards"][0]["file"] = name
    (out / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="not a plain file name"):
        inspect(out)
    with pytest.raises(ValueError, match="not a plain file name"):
        PackedShards(str(out))
    assert any(p.check == "name" for p in verify(out))


@pytest.mark.parametrize("name", [None, "manifest.json"])
def test_a_shard_listed_twice_or_named_manifest_is_never_read(built, tmp_path, name):
    from prep.inspection import inspect
    from prep.verify import verify
    from train.data import PackedShards

    out = Path(shutil.copytree(built, tmp_path / "copy"))
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["shards"].append({**manifest["shards"][0], **({"file": name} if name else {})})
    (out / "manifest.json").write_text(json.dumps(manifest))
    for reader in (inspect, PackedShards):
        with pytest.raises(ValueError, match="twice or names itself"):
            reader(str(out))
    assert [p.check for p in verify(out) if p.check == "name"] == ["name"]
