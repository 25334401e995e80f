"""Grid and variants-file parsing: products, names, typed overrides, one clear message per mistake."""
from __future__ import annotations

import pytest

from spot_fast.config import preset
from spot_fast.train.config import TrainError
from spot_fast.sweep.grid import GridError, Variant, expand, load_variants, resolve, resolve_variants


def test_grid_product_names_and_resolved_configs():
    variants = expand(["slot_attention.num_slots=5,6,7", "slot_attention.truncate=none,bi-level"])
    assert [v.name for v in variants] == [
        "num_slots=5_truncate=none", "num_slots=5_truncate=bi-level", "num_slots=6_truncate=none",
        "num_slots=6_truncate=bi-level", "num_slots=7_truncate=none", "num_slots=7_truncate=bi-level"]
    cfg = resolve(preset("coco"), variants[3])
    assert cfg.slot_attention.num_slots == 6 and cfg.slot_attention.truncate == "bi-level"
    assert cfg.slot_attention.slot_size == 256 and cfg.decoder == preset("coco").decoder


def test_ambiguous_short_keys_keep_their_section():
    names = [v.name for v in expand(["slot_attention.num_heads=1,2", "decoder.num_heads=2,4"])]
    assert names[0] == "slot_attention.num_heads=1_decoder.num_heads=2"


def test_typed_values_none_and_bool():
    cfg = resolve(preset("tiny"), Variant("v", {"decoder.num_cross_heads": "none", "optim.final_ce_weight": "1e-3",
                                                "slot_attention.use_kernel": "false"}))
    assert cfg.decoder.num_cross_heads is None and cfg.optim.final_ce_weight == 1e-3
    assert cfg.slot_attention.use_kernel is False
    assert resolve(preset("tiny"), Variant("v", {"decoder.num_cross_heads": "1"})).decoder.num_cross_heads == 1


@pytest.mark.parametrize("grid, message", [
    (["slot_attention.num_slotz=5,6"], "unknown key 'slot_attention.num_slotz': did you mean slot_attention.num_slots"),
    (["slots.num=5"], "unknown key 'slots.num': keys: decoder.eval_orders, decoder.kind, "),
    (["slot_attention.num_slots"], "write key=value1,value2"),
    (["slot_attention.num_slots=5,,6"], "write key=value1,value2"),
    (["slot_attention.num_slots=5,five"], "expected a value of type int"),
    (["encoder.image_size=224,448"], "the cache fixes the encoder"),
    (["optim.batch_size=32,64"], "same batches"),
    (["decoder.kind=mlp", "decoder.kind=transformer"], "lists a key twice"),
])
def test_grid_mistakes_are_one_message(grid, message):
    with pytest.raises(GridError, match=message.replace("(", r"\(").replace(")", r"\)")):
        expand(grid)


@pytest.mark.parametrize("overrides, message", [
    ({"slot_attention.num_slots": "five"},
     "variant v: --set slot_attention.num_slots=five: expected a value of type int"),
    ({"slot_attention.truncate": "half"}, "variant v: .*truncate must be"),
    ({"slot_attention.use_kernel": "maybe"}, "expected a value of type bool"),
    ({"decoder.kind": "mlp"}, "variant v: .*the MLP decoder only has the raster order"),
])
def test_bad_values_name_the_variant_and_key(overrides, message):
    """(resolve: a variants file's values are read when the variant is resolved)"""
    with pytest.raises(GridError, match=message):
        resolve(preset("tiny"), Variant("v", overrides))


VARIANTS = """
[base]
decoder.eval_orders = "all"

[variants.spot]

[variants.dinosaur]
decoder = { kind = "mlp", train_orders = "standard", eval_orders = "standard" }

[variants.no-trunc]
"slot_attention.truncate" = "none"
optim.ce_weight = 0.01
slot_attention.use_kernel = false
"""


def test_variants_file_with_base_nested_and_dotted_keys(tmp_path):
    path = tmp_path / "v.toml"
    path.write_text(VARIANTS)
    spot, dino, trunc = load_variants(path)
    assert spot.name == "spot" and spot.overrides == {"decoder.eval_orders": "all"}
    assert dino.overrides["decoder.kind"] == "mlp" and dino.overrides["decoder.eval_orders"] == "standard"
    assert trunc.overrides == {"decoder.eval_orders": "all", "slot_attention.truncate": "none",
                               "optim.ce_weight": "0.01", "slot_attention.use_kernel": "false"}
    assert resolve(preset("tiny"), dino).decoder.num_orders == 1
    names = [v.name for v in expand(["optim.lr=1e-4,4e-4"], path)]
    assert names[:2] == ["spot_lr=1e-4", "spot_lr=4e-4"] and len(names) == 6


@pytest.mark.parametrize("text, message", [
    ("[variants.a]\nx = [1, 2]", "must be a number, a string or a boolean"),
    ("[variantz.a]\nx = 1", r"write \[variants.NAME\] tables"),
    ("[variants.a\n", "is not valid TOML"),
    ('[variants."a b"]\n', "variant name 'a b'"),
    ("[variants.a]\noptim.epochs = 3", "optim.epochs cannot vary"),
])
def test_variants_file_mistakes(tmp_path, text, message):
    path = tmp_path / "v.toml"
    path.write_text(text)
    with pytest.raises(GridError, match=message):
        expand([], path)


def test_missing_variants_file_and_grid_clash(tmp_path):
    with pytest.raises(GridError, match="cannot read the variants file"):
        load_variants(tmp_path / "nope.toml")
    path = tmp_path / "v.toml"
    path.write_text("[variants.a]\nslot_attention.num_slots = 4\n")
    with pytest.raises(GridError, match="'a' sets slot_attention.num_slots, which --grid also varies"):
        expand(["slot_attention.num_slots=5,6"], path)


@pytest.mark.parametrize("grid, same", [
    (["slot_attention.num_slots=5,5"], ("num_slots=5", "num_slots=5")),
    (["slot_attention.num_slots=03,3"], ("num_slots=03", "num_slots=3")),
    (["optim.lr=1e-3,0.001"], ("lr=1e-3", "lr=0.001")),
    (["slot_attention.truncate=none,bi-level", "optim.clip=0.3,3e-1"],
     ("truncate=none_clip=0.3", "truncate=none_clip=3e-1")),
])
def test_grid_values_that_resolve_to_one_config_are_refused(grid, same):
    variants = expand(grid)                 # the names are the values as typed; the configs compare parsed
    with pytest.raises(TrainError, match=f"variants '{same[0]}' and '{same[1]}' are the same config"):
        resolve_variants(preset("tiny"), variants)


def test_variants_that_resolve_to_one_config_are_refused(tmp_path):
    base = preset("tiny")
    variants = [Variant("a", {"optim.lr": "1e-3"}), Variant("b", {"optim.lr": "0.001"}), Variant("c", {})]
    with pytest.raises(TrainError, match="variants 'a' and 'b' are the same config"):
        resolve_variants(base, variants)
    resolved = resolve_variants(base, variants[1:])
    assert [cfg.optim.lr for _, cfg in resolved] == [1e-3, base.optim.lr]
    with pytest.raises(TrainError, match="variants 'b' and 'c' are the same config"):   # c repeats the base
        resolve_variants(base, [Variant("b", {"optim.lr": str(base.optim.lr)}), Variant("c", {})])
    path = tmp_path / "v.toml"             # named variants from a file, refused the same way
    path.write_text("[variants.four]\nslot_attention.num_slots = 4\n[variants.also_four]\n"
                    "slot_attention = { num_slots = 4 }\n")
    with pytest.raises(TrainError, match="variants 'four' and 'also_four' are the same config"):
        resolve_variants(base, expand([], path))
