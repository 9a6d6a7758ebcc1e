"""`budget-callback plan --model`: any model before it runs, the same peak as the callback's fit-start forecast
for the same run (a real fit on the CPU), and a clear answer for every bad input."""

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from budget_callback import BudgetCallback
from budget_callback.cli import main
from helpers import token_loader, trainer

TESTS = Path(__file__).resolve().parents[1]
RUN = ["--batch-size", "4", "--seq-len", "64", "--precision", "32-true", "--steps", "3", "--json"]


def _plan(capsys, *args):
    cwd = os.getcwd()
    os.chdir(TESTS)  # the plan imports the factory's module from the working directory, as `python -m` does
    try:
        code = main(["plan", *args])
    finally:
        os.chdir(cwd)
    return code, json.loads(capsys.readouterr().out)


def _fit_forecast(tmp_path, module):
    import plan_models

    cb = BudgetCallback(tmp_path / "s", verbose=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer(tmp_path, [cb], max_steps=6 if module.automatic_optimization is False else 3).fit(
            module, token_loader(vocab=plan_models.V, seq=64, n=16, batch=4))
    return cb.forecast.to_dict()


def _same_forecast(planned: dict, fitted: dict) -> None:
    """The plan's peak, method and parameter count are the fit-start forecast's own."""
    assert planned["memory"]["peak_bytes"] == fitted["memory"]["peak_bytes"] > 0
    assert planned["memory"]["activations_method"] == fitted["memory"]["activations_method"]
    assert planned["params"]["total"] == fitted["params"]["total"]


@pytest.mark.parametrize("name", ["llama", "untyped_gpt", "deep_gpt", "manual", "lens", "demo", "onecycle"])
def test_plan_model_is_the_callbacks_own_forecast_of_the_same_run(tmp_path, capsys, name):
    import plan_models

    code, planned = _plan(capsys, "--model", f"plan_models:{name}", *RUN)
    torch.manual_seed(0)
    fitted = _fit_forecast(tmp_path, plan_models.FACTORIES[name]())
    assert code == 0
    _same_forecast(planned, fitted)
    assert planned["memory"]["peak_phase"] == fitted["memory"]["peak_phase"]
    assert planned["storage"]["snapshot_bytes"] == fitted["storage"]["snapshot_bytes"]
    for key in ("optimizer", "momentum"):  # the optimizer the model configures, not --optimizer's default
        assert planned["run"][key] == fitted["run"][key], key
    assert any(n == f"model: --model plan_models:{name}" for n in planned["notes"])


@pytest.mark.parametrize("name", ["bert_mlm", "t5", "lora_llama"])
def test_plan_model_of_hugging_face_models_is_the_callbacks_own_forecast(tmp_path, capsys, name):
    """BERT masked LM, T5 (encoder-decoder) and a peft LoRA Llama through `--model`, where transformers (and
    peft) are installed: they are optional, never dependencies."""
    pytest.importorskip("transformers", reason="these models need transformers (optional)")
    if name == "lora_llama":
        pytest.importorskip("peft", reason="a LoRA model needs peft (optional)")
    import plan_models

    code, planned = _plan(capsys, "--model", f"plan_models:{name}", *RUN)
    torch.manual_seed(0)
    fitted = _fit_forecast(tmp_path, plan_models.HUGGING_FACE[name]())
    assert code == 0
    _same_forecast(planned, fitted)


def test_a_plain_module_returning_a_dict_of_logits_is_traced_as_one_returning_them(capsys):
    _, plain = _plan(capsys, "--model", "plan_models:core", *RUN)
    _, as_dict = _plan(capsys, "--model", "plan_models:core_dict", *RUN)
    assert as_dict["memory"]["activations_method"].startswith("traced")
    assert as_dict["memory"]["peak_bytes"] == plain["memory"]["peak_bytes"]


def test_a_step_that_cannot_run_at_the_guessed_micro_batch_names_one_that_was_traced(capsys):
    """The slope guesses far beyond 64, where the step cannot run: the answer is a micro-batch traced to fit."""
    code, plan = _plan(capsys, "--model", "plan_models:batch_table", *RUN, "--memory-budget", "1GiB")
    assert code == 0 and plan["decision"] == "fits" and 4 <= plan["memory"]["max_batch_size"] <= 64


def test_analytic_settings_are_said_to_be_ignored_for_a_traced_model(capsys):
    _, plain = _plan(capsys, "--model", "plan_models:llama", *RUN)
    _, flagged = _plan(capsys, "--model", "plan_models:llama", *RUN, "--activation-checkpointing", "--keep-logits")
    assert flagged["memory"]["peak_bytes"] == plain["memory"]["peak_bytes"]
    assert flagged["run"]["activation_checkpointing"] is False and flagged["run"]["keep_logits"] is False
    assert any(n.startswith("--activation-checkpointing, --keep-logits ignored") for n in flagged["notes"])


def test_a_compiled_plain_module_is_reported_under_its_own_name(capsys):
    cwd = os.getcwd()
    os.chdir(TESTS)
    try:
        main(["plan", "--model", "plan_models:core", "--batch-size", "2", "--seq-len", "16", "--compile"])
    finally:
        os.chdir(cwd)
    assert capsys.readouterr().out.startswith("Core (traced):")


def test_a_plain_module_is_trained_on_the_cross_entropy_of_its_logits(tmp_path, capsys):
    import plan_models

    code, planned = _plan(capsys, "--model", "plan_models:core", *RUN, "--optimizer-impl", "for-loop")
    fitted = _fit_forecast(tmp_path, plan_models.Wrapped())
    assert code == 0 and planned["memory"]["peak_bytes"] == fitted["memory"]["peak_bytes"]


def test_largest_micro_batch_and_fewest_devices_come_from_the_traced_slope(capsys):
    code, small = _plan(capsys, "--model", "plan_models:llama", *RUN, "--memory-budget", "64MiB")
    _, fsdp = _plan(capsys, "--model", "plan_models:llama", *RUN, "--memory-budget", "64MiB", "--strategy", "fsdp",
                    "--devices", "4")
    assert code == 0 and small["memory"]["max_batch_size"] > 4 and small["memory"]["min_devices"] == 1
    assert fsdp["memory"]["params_bytes"] < small["memory"]["params_bytes"]  # sharded four ways
    assert fsdp["memory"]["max_batch_size"] >= small["memory"]["max_batch_size"]


def test_the_largest_micro_batch_named_fits_and_the_next_does_not(capsys):
    """The promise, planned at the sizes it names (Lightning's demo Transformer: on the line through 19 and 20 it
    was 351, whose own plan is 5.8 GB against 4 GiB)."""
    run = ["--model", "lightning.pytorch.demos:LightningTransformer", "--seq-len", "35", "--precision", "32-true",
           "--steps", "10", "--memory-budget", "4GiB", "--json"]
    _, small = _plan(capsys, *run, "--batch-size", "20")
    largest = small["memory"]["max_batch_size"]
    _, at = _plan(capsys, *run, "--batch-size", str(largest))
    _, over = _plan(capsys, *run, "--batch-size", str(largest + 1))
    assert largest > 20 and at["decision"] == "fits" and over["decision"] == "abort"
    assert at["memory"]["max_batch_size"] == over["memory"]["max_batch_size"] == largest  # asked at any size


@pytest.mark.parametrize("args,says", [
    (["--model", "plan_models"], "--model takes MODULE:CALLABLE"),
    (["--model", "no_such_module:f"], "--model: cannot import 'no_such_module'"),
    (["--model", "plan_models:nothing_here"], "--model: 'plan_models' has no 'nothing_here'"),
    (["--model", "plan_models:not_a_module"], "returned int, not a LightningModule or an nn.Module"),
    (["--model", "plan_models:llama", "--preset", "gpt2"], "give one model"),
    (["--model", "plan_models:core", "--batch", "plan_models:core"],
     "--batch: plan_models:core(batch_size, seq_len) raised TypeError"),
    (["--preset", "gpt2-tiny", "--batch", "plan_models:nothing_here"], "--batch is the batch of --model"),
])
def test_bad_model_input_exits_2_naming_the_flag(capsys, args, says):
    cwd = os.getcwd()
    os.chdir(TESTS)
    try:
        with pytest.raises(SystemExit) as exit_:
            main(["plan", *args, "--seq-len", "64"])
    finally:
        os.chdir(cwd)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and says in err and err.startswith("budget-callback: error:")
    assert err.count("\n") == 1


def test_seq_len_is_required_with_a_model(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["plan", "--model", "plan_models:llama"])
    assert exit_.value.code == 2 and "--seq-len is required" in capsys.readouterr().err


def test_hf_config_without_transformers_says_what_to_install(tmp_path, capsys):
    pytest.importorskip("torch")
    try:
        import transformers  # noqa: F401
        pytest.skip("transformers is installed here: the message is for machines without it")
    except ImportError:
        pass
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    with pytest.raises(SystemExit) as exit_:
        main(["plan", "--hf-config", str(tmp_path / "config.json"), "--seq-len", "64"])
    assert exit_.value.code == 2 and "needs the `transformers` package" in capsys.readouterr().err


def test_plan_without_a_model_imports_no_torch():
    code = ("import sys; from budget_callback.cli import main; main(['plan', '--preset', 'gpt2-tiny', '--json']); "
            "assert 'torch' not in sys.modules and 'lightning' not in sys.modules")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_readme_plan_model_output_is_current(capsys):
    """The README shows the real output of its `plan --model` example (Lightning's demo Transformer)."""
    readme = (TESTS.parent / "README.md").read_text()
    marker = "Lightning's own demo Transformer (the first command above; nothing downloaded):\n\n```\n"
    shown = readme[readme.index(marker) + len(marker):].split("```")[0]
    main(["plan", "--model", "lightning.pytorch.demos:LightningTransformer", "--batch-size", "20", "--seq-len", "35",
          "--precision", "32-true", "--steps", "10000", "--memory-budget", "4GiB"])
    assert capsys.readouterr().out == shown


HF_CONFIGS = {  # small configs of the Hugging Face models the callback was tried on (built from config, no weights)
    "gpt2": {"model_type": "gpt2", "vocab_size": 512, "n_embd": 64, "n_layer": 2, "n_head": 4, "n_positions": 128},
    "llama": {"model_type": "llama", "vocab_size": 512, "hidden_size": 64, "intermediate_size": 128,
              "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2},
    "qwen2": {"model_type": "qwen2", "vocab_size": 512, "hidden_size": 64, "intermediate_size": 128,
              "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2},
    "gpt_neox": {"model_type": "gpt_neox", "vocab_size": 512, "hidden_size": 64, "intermediate_size": 128,
                 "num_hidden_layers": 2, "num_attention_heads": 4},
}


@pytest.mark.parametrize("name", list(HF_CONFIGS))
def test_hf_config_plans_as_the_callback_forecasts_the_same_model(tmp_path, capsys, name):
    """Where transformers is installed (it is optional): `plan --hf-config` is the fit-start forecast of a
    LightningModule training that model on its own loss."""
    transformers = pytest.importorskip("transformers", reason="--hf-config needs transformers (optional)")
    import lightning as L

    config_path = tmp_path / "config.json"
    config_path.write_text(json.dumps(HF_CONFIGS[name]))
    code, planned = _plan(capsys, "--hf-config", str(config_path), *RUN, "--optimizer-impl", "for-loop")

    class Lit(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.from_pretrained(
                str(config_path)))

        def training_step(self, batch, batch_idx):
            return self.model(input_ids=batch[0], labels=batch[1]).loss

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), foreach=False)

    fitted = _fit_forecast(tmp_path, Lit())
    assert code == 0 and planned["memory"]["peak_bytes"] == fitted["memory"]["peak_bytes"]
