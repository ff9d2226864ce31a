"""python/retrieval_check.py (the retrieval step of `make demo`) on a tiny asset directory written here."""

import json
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def _assets(tmp: Path, W=16, S=2):
    sys.path.insert(0, str(REPO / "python"))
    try:
        import retrieval_demo as rd
    finally:
        sys.path.remove(str(REPO / "python"))
    import ahn_ops
    from ahn_ops.data import BYTE_VOCAB
    from ahn_ops.models import save_ahn_weights

    p = dict(rd.PRESETS["toy"], window=W, sinks=S)
    model = rd.build_model(p, BYTE_VOCAB, seed=0)
    model.save_pretrained(tmp / "base")
    ahn_ops.patch_qwen(model, "gdn", window=W, sinks=S)
    with torch.no_grad():  # a non-zero AHN output: window-only and AHN must differ
        for name, prm in model.named_parameters():
            if name.endswith(".ahn.fn.o_proj.weight"):
                prm.normal_(0, 0.5)
    save_ahn_weights(model, tmp / "ahn")
    (tmp / "results.json").write_text(json.dumps(dict(params=p, window=W, sinks=S)))
    return model


def test_retrieval_check_runs_on_written_assets(tmp_path, capsys):
    sys.path.insert(0, str(REPO / "python"))
    try:
        import retrieval_check
    finally:
        sys.path.remove(str(REPO / "python"))
    _assets(tmp_path)
    assert retrieval_check.main(["--assets", str(tmp_path), "-n", "2", "--mults", "2", "4", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| 2W") or line.startswith("| 4W")]
    assert len(rows) == 2, out
    for r in rows:
        cells = [c.strip() for c in r.strip("|").split("|")]
        assert len(cells) == 6, r
        for c in cells[1:4]:
            assert 0.0 <= float(c) <= 1.0, r
        assert cells[4].endswith("KiB") and cells[5].endswith("KiB"), r
    # the AHN cache is the same at both lengths, the full KV cache doubles
    a2, a4 = (float(r.strip("|").split("|")[4].split()[0]) for r in rows)
    f2, f4 = (float(r.strip("|").split("|")[5].split()[0]) for r in rows)
    assert a2 == a4 and f4 == 2 * f2


def test_retrieval_check_without_assets(tmp_path, capsys):
    sys.path.insert(0, str(REPO / "python"))
    try:
        import retrieval_check
    finally:
        sys.path.remove(str(REPO / "python"))
    assert retrieval_check.main(["--assets", str(tmp_path / "absent")]) == 0
    assert "no demo weights" in capsys.readouterr().out


def test_shipped_demo_weights_retrieve_beyond_the_window(capsys):
    # the weights in assets/retrieval_demo (README's main command): the needle is beyond the window; the
    # window alone cannot answer, the AHN memory does (H200 bf16, 256 examples: 80% exact at 4W, 37% at 8W;
    # CPU fp32, 32 examples: 78% / 34%)
    root = REPO / "assets" / "retrieval_demo"
    sys.path.insert(0, str(REPO / "python"))
    try:
        import retrieval_check
    finally:
        sys.path.remove(str(REPO / "python"))
    assert retrieval_check.main(["--assets", str(root), "-n", "16", "--mults", "4", "8", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    for mult, min_ahn in ((4, 0.5), (8, 0.15)):
        row = [line for line in out.splitlines() if line.startswith(f"| {mult}W")]
        assert len(row) == 1, out
        full, window, ahn = (float(c) for c in row[0].strip("|").split("|")[1:4])
        assert full >= 0.8 and window <= 0.1 and ahn >= min_ahn, row[0]
