"""benchmarks/data_scale.py: the scaled ISIC 2019 rows keep the real mix, and the images their real sizes."""

from PIL import Image

from benchmarks import data_scale


def test_subset_keeps_the_real_csv_rows_and_the_ham10000_size_mix(shared_data, tmp_path):
    rows = data_scale.subset_csvs(shared_data / "isic2019", 40, tmp_path / "raw")
    assert len(rows) == 40 and len({name for name, _ in rows}) == 40
    ham = sum(is_ham for _, is_ham in rows)
    assert 0 < ham < 40  # rows spread over the whole file: HAM10000 rows and the others
    data_scale.write_images(rows[:1] + [r for r in rows if r[1] != rows[0][1]][:1], tmp_path / "images")
    sizes = {Image.open(path).size for path in (tmp_path / "images").glob("*.jpg")}
    assert sizes == {data_scale.HAM_SIZE, data_scale.OTHER_SIZE}


def test_feature_cache_row_is_the_fp16_token_grid(tmp_path):
    measured = data_scale.feature_cache_bytes_per_row(tmp_path, rows=4, tokens=17, hidden=32)
    assert measured["formula_bytes_per_row"] == 17 * 32 * 2
    assert measured["formula_bytes_per_row"] <= measured["bytes_per_row"] < 2 * measured["formula_bytes_per_row"] + 4096
