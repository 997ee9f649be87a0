"""Sources: chunk metadata, what read_chunk returns, spec inference, synthetic determinism, one-line errors."""

import re
import time
import tracemalloc

import numpy as np
import pyarrow as pa
import pytest
from parquet_fixtures import (
    TAG_CLASSES,
    VOCAB,
    embedded,
    embedded_x,
    sequence_tokens,
    sequences,
    tabular,
    tabular_x,
    write,
)

from rayscale.config import DataConfig, SyntheticConfig
from rayscale.data.sources import GENERATION_BLOCK_ROWS, Chunk, inspect_source, read_chunk
from rayscale.engine.tasks import DataSpec
from rayscale.errors import UserError


def concat(parts):
    """Row dicts joined in order (object columns stay object arrays of per-row arrays)."""
    out = {}
    for key in parts[0]:
        if parts[0][key].dtype == object:
            out[key] = np.empty(sum(len(p[key]) for p in parts), dtype=object)
            for i, item in enumerate(item for p in parts for item in p[key]):
                out[key][i] = item
        else:
            out[key] = np.concatenate([p[key] for p in parts])
    return out


def read_all(info, data, seed=0):
    return concat([read_chunk(info.kind, chunk, data, seed) for chunk in info.chunks])


def assert_contiguous(info):
    assert info.chunks[0].start == 0 and info.chunks[-1].stop == info.num_rows
    for before, after in zip(info.chunks[:-1], info.chunks[1:], strict=True):
        assert before.stop == after.start and after.stop > after.start


# ----------------------------------------------------------------------------------------------- Parquet

def one_file(tmp_path):
    return write(tmp_path / "t.parquet", tabular(0, 10))


def two_row_groups(tmp_path):
    return write(tmp_path / "t.parquet", tabular(0, 10), row_group_size=6)


def directory(tmp_path):
    # written out of name order on purpose: files are read sorted, so rows 0-9 come from a.parquet
    write(tmp_path / "d" / "b.parquet", tabular(10, 8), row_group_size=4)
    write(tmp_path / "d" / "a.parquet", tabular(0, 10), row_group_size=5)
    (tmp_path / "d" / "_SUCCESS").write_text("")  # not a .parquet file: ignored
    return str(tmp_path / "d")


def nested_glob(tmp_path):
    write(tmp_path / "g" / "part-1" / "x.parquet", tabular(0, 5))
    write(tmp_path / "g" / "part-2" / "x.parquet", tabular(5, 5))
    write(tmp_path / "g" / "part-2" / "x.csv.parquet.bak", tabular(99, 1))  # not matched by the glob
    return str(tmp_path / "g" / "part-*" / "*.parquet")


def file_uri(tmp_path):
    write(tmp_path / "u" / "a.parquet", tabular(0, 4))
    write(tmp_path / "u" / "b.parquet", tabular(4, 4))
    return (tmp_path / "u").as_uri()


def float_label(tmp_path):
    return write(tmp_path / "t.parquet", tabular(0, 10, label="float"))


def no_statistics(tmp_path):  # the class count must then come from reading the label column
    return write(tmp_path / "t.parquet", tabular(0, 10), write_statistics=False, row_group_size=4)


def fixed_list(tmp_path):
    return write(tmp_path / "t.parquet", embedded(0, 9), row_group_size=4)


def variable_list(tmp_path):
    return write(tmp_path / "t.parquet", embedded(0, 9, fixed=False), row_group_size=4)


def token_sequences(tmp_path):
    write(tmp_path / "s" / "0.parquet", sequences(0, 6), row_group_size=4)
    write(tmp_path / "s" / "1.parquet", sequences(6, 5))
    return str(tmp_path / "s")


TABULAR = {"x": tabular_x, "y": lambda ids: ids % 3}
WEIGHTED = {**TABULAR, "weight": lambda ids: 1 + ids % 2}


@pytest.mark.parametrize("make, data, spec, expected, rows", [
    # scalar columns, weight excluded from the features because it is data.weight
    pytest.param(one_file, {"weight": "w"}, DataSpec("classification", (2,), 3), WEIGHTED, 10, id="one-file"),
    # without data.weight, w is one more feature
    pytest.param(one_file, {}, DataSpec("classification", (3,), 3),
                 {"x": lambda ids: np.column_stack([tabular_x(ids), 1 + ids % 2]), "y": lambda ids: ids % 3}, 10,
                 id="every-other-column-is-a-feature"),
    pytest.param(one_file, {"features": ["b"], "num_classes": 7}, DataSpec("classification", (1,), 7),
                 {"x": lambda ids: (ids % 5)[:, None], "y": lambda ids: ids % 3}, 10, id="explicit-features"),
    pytest.param(two_row_groups, {"weight": "w"}, DataSpec("classification", (2,), 3), WEIGHTED, 10,
                 id="row-groups"),
    pytest.param(directory, {"weight": "w"}, DataSpec("classification", (2,), 3), WEIGHTED, 18, id="directory"),
    pytest.param(nested_glob, {"weight": "w"}, DataSpec("classification", (2,), 3), WEIGHTED, 10, id="glob"),
    pytest.param(file_uri, {"weight": "w"}, DataSpec("classification", (2,), 3), WEIGHTED, 8, id="file-uri"),
    pytest.param(no_statistics, {"weight": "w"}, DataSpec("classification", (2,), 3), WEIGHTED, 10,
                 id="no-footer-statistics"),
    pytest.param(float_label, {"weight": "w"}, DataSpec("regression", (2,), 1),
                 {**WEIGHTED, "y": lambda ids: (ids / 4)[:, None]}, 10, id="float-label-is-regression"),
    pytest.param(fixed_list, {}, DataSpec("classification", (3,), 4), {"x": embedded_x, "y": lambda ids: ids % 4},
                 9, id="fixed-size-list-feature"),
    pytest.param(variable_list, {}, DataSpec("classification", (3,), 4),
                 {"x": embedded_x, "y": lambda ids: ids % 4}, 9, id="list-feature"),
])
def test_parquet_reads_back(tmp_path, make, data, spec, expected, rows):
    source = make(tmp_path)
    config = DataConfig(source=source, **data)
    info = inspect_source(source, config, seed=0)
    assert (info.kind, info.spec, info.num_rows) == ("parquet", spec, rows)
    assert_contiguous(info)
    for chunk in info.chunks:
        got = read_chunk(info.kind, chunk, config, seed=0)
        assert got["row_id"].dtype == np.int64
        np.testing.assert_array_equal(got["row_id"], np.arange(chunk.start, chunk.stop))
    got = read_all(info, config)
    ids = np.arange(rows)
    np.testing.assert_array_equal(got["row_id"], ids)
    assert set(got) == {"row_id", *expected}
    for key, value in expected.items():
        want = value(ids)
        dtype = np.int64 if key == "y" and spec.task == "classification" else np.float32
        assert got[key].dtype == dtype, key
        assert got[key].shape == want.shape, key
        np.testing.assert_allclose(got[key], want.astype(dtype), err_msg=key)


def test_directory_chunks_follow_file_and_row_group_order(tmp_path):
    source = directory(tmp_path)
    info = inspect_source(source, DataConfig(source=source), seed=0)
    described = [(c.path.rsplit("/", 1)[-1], c.row_group, c.start, c.stop) for c in info.chunks]
    assert described == [("a.parquet", 0, 0, 5), ("a.parquet", 1, 5, 10),
                         ("b.parquet", 0, 10, 14), ("b.parquet", 1, 14, 18)]


def test_token_sequences(tmp_path):
    source = token_sequences(tmp_path)
    config = DataConfig(source=source, sequence="tokens", label="tags")
    info = inspect_source(source, config, seed=0)
    # longest row holds 2 + 3 tokens; every token 0..6 occurs
    assert info.spec == DataSpec("token_classification", (5,), TAG_CLASSES, VOCAB)
    assert info.num_rows == 11 and len(info.chunks) == 3
    assert_contiguous(info)
    got = read_all(info, config)
    assert got["x"].dtype == object and got["y"].dtype == object
    for row_id, tokens, tags in zip(got["row_id"], got["x"], got["y"], strict=True):
        assert tokens.dtype == np.int64 and tags.dtype == np.int64
        np.testing.assert_array_equal(tokens, sequence_tokens(row_id))
        np.testing.assert_array_equal(tags, sequence_tokens(row_id) % TAG_CLASSES)


# ------------------------------------------------------------------------------------------------ errors

def bad_bytes(tmp_path):
    path = tmp_path / "bad.parquet"
    path.write_text("not parquet at all")
    return str(path)


def string_feature(tmp_path):
    return write(tmp_path / "s.parquet", pa.table({"name": ["x", "y"], "label": [0, 1]}))


def no_rows(tmp_path):
    return write(tmp_path / "empty.parquet", tabular(0, 0))


def negative_label(tmp_path):
    return write(tmp_path / "neg.parquet", pa.table({"a": [1.0, 2.0], "label": [0, -1]}))


def empty_dir(tmp_path):
    (tmp_path / "nothing").mkdir()
    return str(tmp_path / "nothing")


def name_only(name):
    return lambda tmp_path: name


@pytest.mark.parametrize("make, data, key, fragments", [
    pytest.param(name_only("data/x.parquet"), {}, "data.source",
                 ["data.source: no Parquet file at 'data/x.parquet' (expected a file, a directory of .parquet "
                  "files, a glob or a URI)"], id="missing-path"),
    pytest.param(name_only("data/x.parquet"), {}, "data.val_source",
                 ["data.val_source: no Parquet file at 'data/x.parquet'"], id="missing-val-path"),
    pytest.param(name_only("digit"), {}, "data.source", ["no Parquet file at 'digit'", "(did you mean digits?)"],
                 id="typo-digits"),
    pytest.param(name_only("synthtic"), {}, "data.source", ["(did you mean synthetic?)"], id="typo-synthetic"),
    pytest.param(empty_dir, {}, "data.source", ["data.source: no Parquet file at", "nothing"], id="empty-dir"),
    pytest.param(bad_bytes, {}, "data.source", ["data.source:", "bad.parquet is not a readable Parquet file ("],
                 id="not-parquet"),
    pytest.param(one_file, {"label": "target"}, "data.source",
                 ["data.label: column 'target' not in", "t.parquet (columns: a, b, w, label)"], id="missing-label"),
    pytest.param(one_file, {"features": ["a", "zz"]}, "data.source",
                 ["data.features: column 'zz' not in", "t.parquet"], id="missing-feature"),
    pytest.param(one_file, {"weight": "zz"}, "data.source", ["data.weight: column 'zz' not in", "t.parquet"],
                 id="missing-weight"),
    pytest.param(one_file, {"sequence": "zz"}, "data.source", ["data.sequence: column 'zz' not in", "t.parquet"],
                 id="missing-sequence"),
    pytest.param(one_file, {"sequence": "a"}, "data.source",
                 ["data.sequence: column 'a' in", "t.parquet is double, expected a list of integers"],
                 id="sequence-not-a-list"),
    pytest.param(string_feature, {}, "data.source",
                 ["data.features: column 'name' in", "s.parquet is string, expected numbers"], id="string-feature"),
    pytest.param(no_rows, {}, "data.source", ["data.source:", "empty.parquet has no rows"], id="no-rows"),
    pytest.param(negative_label, {}, "data.source",
                 ["data.label: column 'label' in", "neg.parquet has label -1 (row 1); expected classes 0, 1, 2, ..."],
                 id="negative-label"),
    # data.num_classes is for classes; a float label holds regression targets and would silently ignore it
    pytest.param(float_label, {"num_classes": 4}, "data.source",
                 ["data.num_classes: column 'label' in", "t.parquet is double, which holds regression targets"],
                 id="num-classes-with-float-label"),
])
def test_inspect_errors(tmp_path, make, data, key, fragments):
    source = make(tmp_path)
    with pytest.raises(UserError) as caught:
        inspect_source(source, DataConfig(**data), seed=0, key=key)
    message = str(caught.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message


def mismatched_tags(tmp_path):
    table = pa.table({"tokens": pa.array([[1, 2, 3]], pa.list_(pa.int64())),
                      "tags": pa.array([[0, 1]], pa.list_(pa.int64()))})
    return write(tmp_path / "m.parquet", table)


def uneven_lists(tmp_path):
    return write(tmp_path / "l.parquet", pa.table({"emb": [[1.0, 2.0], [3.0]], "label": [0, 1]}))


@pytest.mark.parametrize("make, data, fragments", [
    # inspection does not scan labels when the class count is given; reading checks them
    pytest.param(one_file, {"num_classes": 2},
                 ["data.label: column 'label' in", "t.parquet has label 2 (row 2); expected classes 0 to 1 "
                  "(data.num_classes 2)"], id="label-beyond-num-classes"),
    pytest.param(mismatched_tags, {"sequence": "tokens", "label": "tags"},
                 ["data.label: row 0 of", "m.parquet has 2 labels for 3 tokens"], id="labels-per-token"),
    pytest.param(uneven_lists, {}, ["data.features: column 'emb' in", "l.parquet has lists of lengths 1 to 2"],
                 id="uneven-list-feature"),
])
def test_read_errors_in_the_first_row_group_are_found_by_inspection(tmp_path, make, data, fragments):
    """Inspection reads the first row group, so these errors come before any cluster resource is claimed."""
    source = make(tmp_path)
    config = DataConfig(source=source, **data)
    with pytest.raises(UserError) as caught:
        inspect_source(source, config, seed=0)
    message = str(caught.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message


def with_bad_value(tmp_path, column: str, value: float, row: int):
    table = tabular(0, 10)
    values = table.column(column).to_numpy().astype(np.float64)
    values[row] = value
    table = table.set_column(table.schema.get_field_index(column), column, pa.array(values))
    return write(tmp_path / "bad.parquet", table, row_group_size=6)


@pytest.mark.parametrize("column, value, data, key", [
    ("a", np.nan, {}, "data.features"),
    ("a", np.inf, {}, "data.features"),
    ("w", np.nan, {"weight": "w", "features": ["a", "b"]}, "data.weight"),
])
@pytest.mark.parametrize("row", [2, 8])  # in the first row group (found up front) or the second (while reading)
def test_nan_or_inf_is_refused_naming_column_and_row(tmp_path, column, value, data, key, row):
    source = with_bad_value(tmp_path, column, value, row)
    config = DataConfig(source=source, **data)
    with pytest.raises(UserError) as caught:
        read_all(inspect_source(source, config, seed=0), config)  # row 8 passes inspection, fails the read
    message = str(caught.value)
    # The one column of the features (a, b, w here) that holds it, not all of them named as one.
    assert message.startswith(f"{key}: column '{column}' in ") and f"has NaN or infinite values (row {row})" in message
    if row >= 6:
        inspect_source(source, config, seed=0)  # the second row group is not read up front


def test_a_missing_value_is_refused_naming_its_column_and_row(tmp_path):
    table = tabular(0, 10)
    values = table.column("b").to_pylist()
    values[7] = None
    source = write(tmp_path / "gap.parquet", table.set_column(1, "b", pa.array(values, pa.int32())),
                   row_group_size=6)
    config = DataConfig(source=source)
    with pytest.raises(UserError, match=r"^data.features: column 'b' in .*gap.parquet has missing values \(row 7\)$"):
        read_all(inspect_source(source, config, seed=0), config)


def with_value(tmp_path, column: str, value, row: int, name: str = "bad.parquet", **options):
    """tabular(0, 10) in row groups of 6 with one value replaced; a list column's whole row is replaced."""
    table = sequences(0, 10) if column in ("tokens", "tags") else tabular(0, 10)
    values = table.column(column).to_pylist()
    values[row] = value
    table = table.set_column(table.schema.get_field_index(column), column, pa.array(values, table.schema.field(
        column).type))
    return write(tmp_path / name, table, row_group_size=6, **options)


SEQUENCE_COLUMNS = {"sequence": "tokens", "label": "tags"}


# (column, value, config, the error's start, its row part): rows 2 and 8 sit in the first and second row group
OUT_OF_RANGE = [
    # a negative sample weight would push the loss up on that sample
    ("w", -1.5, {"weight": "w"}, "data.weight: column 'w' in", "has weight -1.5 (row {row}); expected weights from "
                                                                 "0 to below 1e+20 (a weighted loss is the same with "
                                                                 "every weight divided by one number: divide the "
                                                                 "column by its largest)"),
    # one above the limit would overflow the step's float32 weighted sum
    ("w", 3e20, {"weight": "w"}, "data.weight: column 'w' in", "has weight 3e+20 (row {row}); expected weights from "
                                                                "0 to below 1e+20 (a weighted loss is the same with "
                                                                "every weight divided by one number: divide the "
                                                                "column by its largest)"),
    # classes are 0 .. num_classes - 1: with the count stated, a larger label is out
    ("label", 3, {"num_classes": 3}, "data.label: column 'label' in",
     "has label 3 (row {row}); expected classes 0 to 2 (data.num_classes 3)"),
    # with the count inferred (max + 1), only a negative label is out
    ("label", -2, {}, "data.label: column 'label' in", "has label -2 (row {row}); expected classes 0, 1, 2, ..."),
    # per-token classes
    ("tags", [0, 5], {**SEQUENCE_COLUMNS, "num_classes": 3}, "data.label: column 'tags' in",
     "has label 5 (row {row}); expected classes 0 to 2 (data.num_classes 3) or -100 (a masked token)"),
    # token ids index the embedding
    ("tokens", [1, -4], SEQUENCE_COLUMNS, "data.sequence: column 'tokens' in",
     "has token -4 (row {row}); expected token ids 0, 1, 2, ..."),
]


@pytest.mark.parametrize("statistics", [True, False], ids=["footer-statistics", "no-statistics"])
@pytest.mark.parametrize("row", [2, 8])
@pytest.mark.parametrize("column, value, data, start, end", OUT_OF_RANGE)
def test_out_of_range_values_are_refused_up_front_naming_the_row(tmp_path, column, value, data, start, end, row,
                                                                  statistics):
    """Found by inspection wherever they are (the footer, or a read of that column, gives the range), then
    named by reading the file's row groups; reading the chunk itself refuses them too."""
    if column == "tags":  # one tag per token: row 2 holds 4 tokens, row 8 holds 2
        value = value + [0] * (len(sequence_tokens(row)) - len(value))
    if column == "tokens":
        value = value + [0] * (len(sequence_tokens(row)) - len(value))
    source = with_value(tmp_path, column, value, row, write_statistics=statistics)
    config = DataConfig(source=source, **data)
    with pytest.raises(UserError) as caught:
        inspect_source(source, config, seed=0)
    message = str(caught.value)
    assert message.startswith(start) and message.endswith(end.format(row=row)), message
    chunk = Chunk(6 if row >= 6 else 0, 10 if row >= 6 else 6, source, int(row >= 6))
    with pytest.raises(UserError, match=re.escape(end.format(row=row))):
        read_chunk("parquet", chunk, config, seed=0)


def test_rows_are_counted_in_the_file_that_holds_them(tmp_path):
    """In the second file of a directory, row 3 is that file's row 3 (not its row id across the source)."""
    write(tmp_path / "d" / "a.parquet", tabular(0, 10))
    with_value(tmp_path / "d", "w", -1.0, 3, name="b.parquet")
    with pytest.raises(UserError, match=r"b\.parquet has weight -1 \(row 3\)"):
        inspect_source(str(tmp_path / "d"), DataConfig(source=str(tmp_path / "d"), weight="w"), seed=0)


def test_weights_of_zero_are_kept(tmp_path):
    source = with_value(tmp_path, "w", 0.0, 8)
    config = DataConfig(source=source, weight="w")
    assert read_all(inspect_source(source, config, seed=0), config)["weight"][8] == 0


# ------------------------------------------------------------------------------------------------ digits

def test_digits():
    from sklearn.datasets import load_digits

    config = DataConfig(source="digits")
    info = inspect_source("digits", config, seed=0)
    assert (info.kind, info.num_rows, info.spec) == ("digits", 1797, DataSpec("classification", (64,), 10))
    assert len(info.chunks) == 8 and all(220 <= c.stop - c.start <= 230 for c in info.chunks)
    assert_contiguous(info)
    got = read_all(info, config)
    assert got["x"].dtype == np.float32 and got["x"].shape == (1797, 64)
    assert got["x"].min() == 0.0 and got["x"].max() == 1.0
    assert got["y"].dtype == np.int64 and set(np.unique(got["y"])) == set(range(10))
    np.testing.assert_array_equal(got["y"], load_digits().target)


# --------------------------------------------------------------------------------------------- synthetic

def synthetic(kind, rows=20_000, **kw):
    return DataConfig(source="synthetic", synthetic=SyntheticConfig(kind=kind, rows=rows, **kw))


@pytest.mark.parametrize("kind, spec, x_shape, y_shape, y_dtype", [
    pytest.param("classification", DataSpec("classification", (32,), 10), (32,), (), np.int64, id="classification"),
    pytest.param("regression", DataSpec("regression", (32,), 1), (32,), (1,), np.float32, id="regression"),
    pytest.param("image", DataSpec("classification", (1, 16, 16), 10), (1, 16, 16), (), np.int64, id="image"),
    pytest.param("sequence", DataSpec("token_classification", (64,), 10, 64), None, None, object, id="sequence"),
])
def test_synthetic_spec_and_shapes(kind, spec, x_shape, y_shape, y_dtype):
    config = synthetic(kind)
    info = inspect_source("synthetic", config, seed=0)
    assert (info.kind, info.spec, info.num_rows) == ("synthetic", spec, 20_000)
    assert [c.stop - c.start for c in info.chunks] == [8192, 8192, 20_000 - 2 * 8192]
    assert_contiguous(info)
    last = read_chunk(info.kind, info.chunks[-1], config, seed=0)
    np.testing.assert_array_equal(last["row_id"], np.arange(2 * 8192, 20_000))
    assert last["y"].dtype == y_dtype
    if x_shape is None:  # sequences: object arrays of int64 tokens and per-token labels
        assert last["x"].dtype == object
        for tokens, labels in zip(last["x"], last["y"], strict=True):
            assert 2 <= len(tokens) <= 64 and tokens.dtype == labels.dtype == np.int64
            assert tokens.min() >= 0 and tokens.max() < 64
            np.testing.assert_array_equal(labels, (tokens + np.concatenate(([0], tokens[:-1]))) % 10)
    else:
        assert last["x"].dtype == np.float32 and last["x"].shape == (len(last["row_id"]), *x_shape)
        assert last["y"].shape == (len(last["row_id"]), *y_shape)


def assert_rows_equal(a, b):
    for key in a:
        if a[key].dtype == object:
            assert len(a[key]) == len(b[key])
            for left, right in zip(a[key], b[key], strict=True):
                np.testing.assert_array_equal(left, right)
        else:
            np.testing.assert_array_equal(a[key], b[key])


@pytest.mark.parametrize("kind", ["classification", "regression", "image", "sequence"])
def test_synthetic_is_deterministic_and_independent_of_chunking(kind):
    config = synthetic(kind)
    block = Chunk(GENERATION_BLOCK_ROWS, 2 * GENERATION_BLOCK_ROWS)
    first = read_chunk("synthetic", block, config, seed=3)
    assert_rows_equal(first, read_chunk("synthetic", block, config, seed=3))  # same seed: same rows
    other = read_chunk("synthetic", block, config, seed=4)
    assert not np.array_equal(np.concatenate(list(first["x"])), np.concatenate(list(other["x"])))
    # a chunk straddling two generation blocks holds exactly those rows of each block
    straddle = read_chunk("synthetic", Chunk(8000, 8400), config, seed=3)
    both = concat([read_chunk("synthetic", Chunk(0, GENERATION_BLOCK_ROWS), config, seed=3), first])
    assert_rows_equal(straddle, {k: v[8000:8400] for k, v in both.items()})
    # the rows do not depend on how many rows the source has in total
    shorter = synthetic(kind, rows=GENERATION_BLOCK_ROWS + 10)
    assert_rows_equal(read_chunk("synthetic", Chunk(GENERATION_BLOCK_ROWS, GENERATION_BLOCK_ROWS + 10), shorter, 3),
                      {k: v[:10] for k, v in first.items()})


def test_synthetic_classification_is_learnable():
    """A linear teacher with noise 0.5: a linear model on 8k rows beats chance (0.1) by far."""
    from sklearn.linear_model import LogisticRegression

    config = synthetic("classification")
    train, test = (read_chunk("synthetic", Chunk(a, a + GENERATION_BLOCK_ROWS), config, seed=0)
                   for a in (0, GENERATION_BLOCK_ROWS))
    model = LogisticRegression(max_iter=300).fit(train["x"], train["y"])
    assert model.score(test["x"], test["y"]) > 0.6
    assert np.bincount(train["y"], minlength=10).min() > 300  # every class is well represented


def test_synthetic_images_carry_their_class():
    """Nearest class mean (templates estimated from one block) classifies another block almost perfectly."""
    config = synthetic("image")
    train, test = (read_chunk("synthetic", Chunk(a, a + GENERATION_BLOCK_ROWS), config, seed=0)
                   for a in (0, GENERATION_BLOCK_ROWS))
    means = np.stack([train["x"][train["y"] == c].mean(axis=0).ravel() for c in range(10)])
    distances = ((test["x"].reshape(len(test["x"]), -1)[:, None, :] - means[None]) ** 2).sum(axis=2)
    assert (distances.argmin(axis=1) == test["y"]).mean() > 0.95


def test_synthetic_inspection_is_metadata_only():
    config = synthetic("classification", rows=2_000_000)
    tracemalloc.start()
    started = time.perf_counter()
    info = inspect_source("synthetic", config, seed=0)
    elapsed = time.perf_counter() - started
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert info.num_rows == 2_000_000 and len(info.chunks) == -(-2_000_000 // GENERATION_BLOCK_ROWS)
    assert_contiguous(info)
    assert elapsed < 0.5
    assert peak < 1_000_000  # bytes: chunk descriptors only; the rows alone would be 256 MB
