"""Model factories for `budget-callback plan --model plan_models:NAME` (tests/ is the working directory's path
in the tests: the plan imports from the current directory first, as `python -m` does)."""

import lightning as L
import torch
from torch import nn

from budget_callback.forecast.shapes import ModelShape
from budget_callback.models.gpt import GPT
from helpers import LensLM, LlamaLM, TwoOptimizerLM

V = 512


class UntypedGPT(L.LightningModule):
    """The reference GPT behind a LightningModule that declares no shape (traced)."""

    def __init__(self, layers: int = 2) -> None:
        super().__init__()
        self.net = GPT(ModelShape(vocab_size=V, d_model=64, n_layer=layers, n_head=4, n_ctx=64))

    def training_step(self, batch, batch_idx):
        return self.net(batch[0], batch[1])[1]

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-3, foreach=False)


class Demo(L.LightningModule):
    """Lightning's demo Transformer (``nn.Transformer``)."""

    def __init__(self) -> None:
        super().__init__()
        from lightning.pytorch.demos import Transformer

        self.model = Transformer(vocab_size=V, ninp=64, nhead=2, nhid=64, nlayers=1)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.nll_loss(self.model(x, y), y.view(-1))

    def configure_optimizers(self):
        return torch.optim.SGD(self.model.parameters(), lr=0.1)


class Core(nn.Module):
    """A plain nn.Module: embedding, two Llama blocks, a head; its logits are all it returns."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = LlamaLM(vocab=V, d=64, layers=2)

    def forward(self, x):
        return self.inner(x)


class Wrapped(L.LightningModule):
    """``Core`` trained the way the plan trains a plain nn.Module: cross-entropy of its logits, AdamW."""

    def __init__(self) -> None:
        super().__init__()
        self.core = Core()

    def training_step(self, batch, batch_idx):
        x, y = batch
        logits = self.core(x)
        return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), foreach=False)


class OneCycle(LlamaLM):
    """SGD with momentum and ``OneCycleLR`` over the Trainer's estimated steps (the pattern Lightning documents):
    ``configure_optimizers()`` asks the Trainer."""

    def __init__(self) -> None:
        super().__init__(vocab=V, d=64, layers=2)

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=self.trainer.estimated_stepping_batches)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


class BatchTable(LlamaLM):
    """A step that runs only up to micro-batch 64: a table indexed by the batch dimension (Lightning 2.2's demo
    Transformer adds its 5,000 positions along the batch)."""

    def __init__(self) -> None:
        super().__init__(vocab=V, d=64, layers=2)
        self.register_buffer("table", torch.zeros(64, 1))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return super().training_step(batch, batch_idx) + (self.table[: x.shape[0]] * x.float()).mean() * 0


class HuggingFaceLM(L.LightningModule):
    """A Hugging Face model built from its config (no weights) and trained on its own ``.loss``; AdamW on the
    parameters that train (a LoRA model's adapters)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def training_step(self, batch, batch_idx):
        return self.model(input_ids=batch[0], labels=batch[1]).loss

    def configure_optimizers(self):
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], foreach=False)


def _bert_mlm() -> HuggingFaceLM:
    import transformers as T

    return HuggingFaceLM(T.BertForMaskedLM(T.BertConfig(vocab_size=V, hidden_size=64, num_hidden_layers=2,
                                                          num_attention_heads=4, intermediate_size=128,
                                                          max_position_embeddings=128)))


def _t5() -> HuggingFaceLM:
    import transformers as T

    return HuggingFaceLM(T.T5ForConditionalGeneration(T.T5Config(vocab_size=V, d_model=64, d_kv=16, d_ff=128,
                                                                   num_layers=2, num_heads=4,
                                                                   decoder_start_token_id=0)))


def _lora_llama() -> HuggingFaceLM:
    import peft
    import transformers as T

    base = T.LlamaForCausalLM(T.LlamaConfig(vocab_size=V, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                            num_attention_heads=4, num_key_value_heads=2))
    lora = peft.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    return HuggingFaceLM(peft.get_peft_model(base, lora))


HUGGING_FACE = {"bert_mlm": _bert_mlm, "t5": _t5, "lora_llama": _lora_llama}  # need transformers (and peft)


def bert_mlm():
    return _bert_mlm()


def t5():
    return _t5()


def lora_llama():
    return _lora_llama()


FACTORIES = {
    "llama": lambda: LlamaLM(vocab=V, d=64, layers=2),
    "untyped_gpt": UntypedGPT,
    "deep_gpt": lambda: UntypedGPT(layers=6),  # a stack deep enough to be extrapolated
    "manual": lambda: TwoOptimizerLM(ModelShape(vocab_size=V, d_model=64, n_layer=2, n_head=4, n_ctx=64, tied=False)),
    "lens": lambda: LensLM(vocab=V, d=64),
    "demo": Demo,
    "onecycle": OneCycle,
}


def llama():
    return FACTORIES["llama"]()


def untyped_gpt():
    return FACTORIES["untyped_gpt"]()


def deep_gpt():
    return FACTORIES["deep_gpt"]()


def manual():
    return FACTORIES["manual"]()


def lens():
    return FACTORIES["lens"]()


def demo():
    return FACTORIES["demo"]()


def onecycle():
    return FACTORIES["onecycle"]()


def batch_table():
    return BatchTable()


def core():
    return Core()


class CoreDict(Core):
    """``Core`` returning ``{"logits": ...}``, as many plain modules do."""

    def forward(self, x):
        return {"logits": super().forward(x)}


def core_dict():
    return CoreDict()


def not_a_module():
    return 42
