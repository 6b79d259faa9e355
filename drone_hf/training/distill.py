"""Distillation from the dense model: a loss for ``Trainer(compute_loss_func=...)``, no subclass.

The compressed student learns from the dense teacher's soft predictions (Hinton et al.): the KL
divergence between temperature-softened distributions, weighted against the task loss, optionally
plus a hidden-state MSE. A compressed student has the teacher's architecture, so layers match one
to one; a shallower student (:func:`~drone_hf.training.shallow_student`) records which teacher
layer each of its layers came from, and its hidden states are matched through that map.

``Trainer`` calls ``compute_loss_func(outputs, labels, num_items_in_batch=...)`` with the student's
outputs only. The teacher needs the same inputs, so :meth:`DistillationLoss.attach` registers a
forward pre-hook on the student that keeps the inputs of its latest call (and asks for hidden states
when they are matched); the loss then runs the teacher on them under ``no_grad``. The teacher is
not a submodule of the student, so Trainer's optimizer never sees it; it is put in eval mode and
frozen, and checked to share no parameter with the student (``drone_hf.compress`` works in place:
compress a copy and keep the dense original as the teacher).

Reduction, matching Trainer's gradient-accumulation accounting: an *item* is an example (sequence
tasks) or a labelled token (causal LM: shifted labels != -100; token classification: labels !=
-100). The loss is ``Σ_items [α·KD + (1-α)·task] / N`` with ``N = num_items_in_batch`` when Trainer
gives it (the items of the whole accumulated batch) and the items of this batch otherwise, so it is
the mean per item either way. ``KD = T²·KL(p_teacher^T || p_student^T)`` per item (the ``T²`` keeps
gradient size independent of ``T``). The hidden term, a per-token MSE averaged over the matched
layers, is a batch mean scaled by ``items / N`` so accumulated batches average it too.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..utils.model_kinds import is_causal_lm
from ._model import unwrap
from .shallow import final_norm, hidden_state_map

#: Tasks the loss knows how to pair logits and labels for.
TASKS = ("auto", "sequence_classification", "regression", "multi_label_classification", "token_classification",
         "causal_lm")


def infer_task(model: nn.Module) -> str:
    """The task of a transformers model, from its class and config (what the loss pairs)."""
    base = unwrap(model)
    if is_causal_lm(base):
        return "causal_lm"
    name = type(base).__name__
    cfg = getattr(base, "config", None)
    if name.endswith("ForTokenClassification"):
        return "token_classification"
    if name.endswith("ForSequenceClassification"):
        if getattr(cfg, "problem_type", None) == "multi_label_classification":
            return "multi_label_classification"
        regression = getattr(cfg, "problem_type", None) == "regression" or getattr(cfg, "num_labels", 2) == 1
        return "regression" if regression else "sequence_classification"
    raise ValueError(
        f"Cannot tell which task {name} is trained for; pass DistillationLoss(task=...) with one of {list(TASKS[1:])}."
    )


def _field(outputs: Any, key: str) -> Any:
    if isinstance(outputs, dict) or hasattr(outputs, "keys"):
        return outputs.get(key) if hasattr(outputs, "get") else outputs[key]
    return getattr(outputs, key, None)


class DistillationLoss:
    """``compute_loss_func`` for ``transformers.Trainer``: KL to a dense teacher + task loss (+ hidden MSE).

    Args:
        teacher: the dense model (same tokenizer and output space as the student). Put in eval mode
            and frozen; kept out of the optimizer (it is never a submodule of the student).
        temperature: softening ``T`` of both distributions (> 0).
        alpha: weight of the KL term; the task loss gets ``1 - alpha`` (in [0, 1]). Without labels
            the loss is the KL term alone.
        hidden_weight: weight ``β`` of the hidden-state MSE (0: off, no hidden states requested).
            Applied in training steps only: in evaluation the student's hidden states are not
            requested (Trainer would collect them as predictions), so eval loss is KL + task.
        hidden_layers: ``"all"`` (every hidden state the models return, embeddings included; for a
            :func:`~drone_hf.training.shallow_student`, every student hidden state against the
            teacher hidden state its layer came from), ``"last"``, indices into ``hidden_states``
            (the same in both models), or a dict ``{student index: teacher index}``.
        task: ``"auto"`` (from the student's class at :meth:`attach`), ``"sequence_classification"``,
            ``"regression"`` (KD = squared difference of outputs, no temperature),
            ``"multi_label_classification"`` (independent yes/no per label, as transformers trains
            ``problem_type="multi_label_classification"``: KD = each label's binary KL at temperature
            ``T``, task loss = binary cross-entropy on 0/1 labels),
            ``"token_classification"`` or ``"causal_lm"`` (next-token: logits and labels shifted).
        teacher_device: where the teacher runs. ``None``: moved to the student's device on first
            use; a device (e.g. ``"cpu"`` to offload it from an accelerator): stays there, inputs go
            to it and its outputs come back.

    Use ``Trainer(model=student, compute_loss_func=DistillationLoss(teacher).attach(student), ...)``
    or :func:`distillation_trainer`. ``last`` holds the detached terms of the latest call.
    """

    def __init__(
        self,
        teacher: nn.Module,
        *,
        temperature: float = 2.0,
        alpha: float = 0.5,
        hidden_weight: float = 0.0,
        hidden_layers: str | Sequence[int] | dict[int, int] = "all",
        task: str = "auto",
        teacher_device: str | torch.device | None = None,
    ) -> None:
        if not isinstance(teacher, nn.Module):
            raise ValueError(f"teacher must be a torch module (the dense model), got {type(teacher).__name__}.")
        for name, value, ok in (
            ("temperature", temperature, lambda v: v > 0),
            ("alpha", alpha, lambda v: 0 <= v <= 1),
            ("hidden_weight", hidden_weight, lambda v: v >= 0),
        ):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not ok(value):
                rule = {"temperature": "> 0", "alpha": "in [0, 1]", "hidden_weight": ">= 0"}[name]
                raise ValueError(f"{name}={value!r} must be a number {rule}.")
        if task not in TASKS:
            raise ValueError(f"task={task!r} is not supported: use one of {list(TASKS)}.")

        def indices(values: Any) -> bool:
            return bool(values) and all(isinstance(i, int) and not isinstance(i, bool) for i in values)

        if not (
            (isinstance(hidden_layers, str) and hidden_layers in ("all", "last"))
            or (isinstance(hidden_layers, (list, tuple)) and indices(hidden_layers))
            or (isinstance(hidden_layers, dict) and indices(hidden_layers) and indices(hidden_layers.values()))
        ):
            raise ValueError(
                f"hidden_layers={hidden_layers!r} must be 'all', 'last', a list of hidden-state indices or a dict "
                "{student index: teacher index}."
            )
        self.teacher = teacher.eval()  # frozen in attach(), once it is known to share nothing with the student
        self.temperature, self.alpha, self.hidden_weight = float(temperature), float(alpha), float(hidden_weight)
        self.hidden_layers = hidden_layers
        self.task = task
        self.teacher_device = torch.device(teacher_device) if teacher_device is not None else None
        if self.teacher_device is not None:
            self.teacher.to(self.teacher_device)
        self.last: dict[str, torch.Tensor] = {}
        self._inputs: dict[str, Any] | None = None
        self._with_hidden = False
        self._handle: Any = None
        self._teacher_flags: dict[nn.Parameter, bool] = {}
        self._layer_map: dict[int, int] | None = None  # a shallow student's hidden-state map, from attach()
        self._teacher_norm: nn.Module | None = None  # the teacher's final norm, for that map's last pair
        #: Micro-batches per optimizer step, read at each training call (``distillation_trainer`` wires it to
        #: the Trainer's). Without labels Trainer counts no ``num_items_in_batch``, so each micro-batch's
        #: loss is its own mean; Trainer does not divide a ``compute_loss_func``'s loss by the accumulation
        #: steps, so this loss does, or gradient accumulation would multiply the gradients by that many.
        self.accumulation_steps: Callable[[], int] | None = None

    # --- wiring to the student ---------------------------------------------------------------------
    def attach(self, student: nn.Module) -> DistillationLoss:
        """Capture the student's forward inputs (needed to run the teacher); returns ``self``.

        Raises:
            ValueError: the teacher is the student or shares parameters with it.
        """
        if student is self.teacher or unwrap(student) is unwrap(self.teacher):
            raise ValueError(
                "The teacher is the student itself. drone_hf.compress works in place: compress a copy "
                "(student = drone_hf.compress(copy.deepcopy(dense), cfg)) and keep the dense model as the teacher."
            )
        shared = {id(p) for p in self.teacher.parameters()} & {id(p) for p in student.parameters()}
        if shared:
            raise ValueError(
                f"The teacher shares {len(shared)} parameter tensor(s) with the student, so training would move the "
                "teacher too. Build the student from a copy: drone_hf.compress(copy.deepcopy(dense), cfg)."
            )
        if self.task == "auto":
            self.task = infer_task(student)
        self._layer_map = hidden_state_map(student)
        self._teacher_norm = final_norm(self.teacher) if self._layer_map is not None else None
        self.detach()
        self._teacher_flags = {p: p.requires_grad for p in self.teacher.parameters()}
        self.teacher.requires_grad_(False)
        self._handle = student.register_forward_pre_hook(self._capture, with_kwargs=True)
        return self

    def detach(self) -> None:
        """Remove the input-capturing hook from the student and give the teacher back its
        ``requires_grad`` flags (the dense model may be trained again afterwards)."""
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        for p, flag in self._teacher_flags.items():
            p.requires_grad_(flag)
        self._teacher_flags = {}
        self._inputs = None  # never run the teacher on inputs from before the detach

    def _capture(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        if args:
            raise ValueError(
                "DistillationLoss needs keyword inputs (model(input_ids=..., attention_mask=...)), as Trainer passes "
                "them; the student was called with positional arguments."
            )
        self._inputs = {k: v for k, v in kwargs.items() if k not in ("labels", "num_items_in_batch")}
        # Hidden states only while training: in evaluation Trainer would gather them as predictions.
        self._with_hidden = self.hidden_weight > 0 and module.training
        if self._with_hidden and not kwargs.get("output_hidden_states"):
            return args, {**kwargs, "output_hidden_states": True}
        return None

    def teacher_outputs(self) -> Any:
        """Run the teacher (eval mode, no grad) on the student's latest inputs."""
        if self._inputs is None:
            raise ValueError(
                "DistillationLoss has not seen the student's inputs: call .attach(student) before training (or use "
                "drone_hf.training.distillation_trainer)."
            )
        if self.teacher.training:
            self.teacher.eval()  # something (a Trainer, the user) switched it: dropout must stay off
        device = self.teacher_device
        if device is None:
            first = next((v for v in self._inputs.values() if torch.is_tensor(v)), None)
            device = first.device if first is not None else torch.device("cpu")
            teacher_param = next(self.teacher.parameters(), None)
            if teacher_param is not None and teacher_param.device != device:
                self.teacher.to(device)
        inputs = {k: v.to(device) if torch.is_tensor(v) else v for k, v in self._inputs.items()}
        if self._with_hidden:
            inputs["output_hidden_states"] = True
        with torch.no_grad():
            return self.teacher(**inputs)

    # --- the loss ----------------------------------------------------------------------------------
    def __call__(self, outputs: Any, labels: torch.Tensor | None, num_items_in_batch: Any = None) -> torch.Tensor:
        teacher = self.teacher_outputs()
        mask = (self._inputs or {}).get("attention_mask")
        loss = self.compute(
            outputs,
            teacher,
            labels,
            attention_mask=mask,
            num_items_in_batch=num_items_in_batch,
            hidden=self._with_hidden,
        )
        if num_items_in_batch is None and torch.is_grad_enabled() and self.accumulation_steps is not None:
            loss = loss / max(int(self.accumulation_steps()), 1)  # training step only: evaluation runs without grad
        return loss

    def compute(
        self,
        student: Any,
        teacher: Any,
        labels: torch.Tensor | None,
        attention_mask: torch.Tensor | None = None,
        num_items_in_batch: Any = None,
        hidden: bool = True,
    ) -> torch.Tensor:
        """The loss from both models' outputs (objects or dicts with ``logits``, ``hidden_states``).

        ``hidden=False`` leaves the hidden-state term out (Trainer evaluation: the student is in eval
        mode, hidden states are not requested, so the eval loss is the KL + task part).
        """
        s = _field(student, "logits")
        task = self.task
        if task == "auto":
            if s.dim() != 2:
                raise ValueError("task='auto' needs attach(student) for token-level outputs; pass task= explicitly.")
            task = "regression" if s.shape[-1] == 1 else "sequence_classification"
        t = _field(teacher, "logits").to(device=s.device, dtype=torch.float32)
        s = s.float()
        if s.shape != t.shape:
            raise ValueError(
                f"Student logits {tuple(s.shape)} and teacher logits {tuple(t.shape)} differ; they must share the "
                "output space."
            )
        lab = labels.to(s.device) if labels is not None else None
        if task == "causal_lm":  # position i predicts token i + 1: kept where that token is real
            keep = lab[:, 1:] != -100 if lab is not None else _mask_like(attention_mask, s)[:, 1:]
            s, t = s[:, :-1], t[:, :-1]
            lab = lab[:, 1:] if lab is not None else None
        elif task == "token_classification":
            keep = lab != -100 if lab is not None else _mask_like(attention_mask, s)
        elif task == "sequence_classification" and lab is not None:
            keep = lab != -100
        else:
            keep = torch.ones(s.shape[0], dtype=torch.bool, device=s.device)
        keep = keep.to(s.device).bool()
        s_items, t_items = s[keep], t[keep]  # [items, classes]
        # loss terms: rows, tokens, or for multi-label every (row, label) pair, as Trainer counts 0/1 label entries
        n_items = int(keep.sum()) * (s.shape[-1] if task == "multi_label_classification" else 1)
        denom = float(num_items_in_batch) if num_items_in_batch is not None else float(max(n_items, 1))
        if task == "regression":
            kd = ((s_items - t_items) ** 2).sum(-1)
        elif task == "multi_label_classification":  # one Bernoulli per label: KL of [p, 1 - p] pairs
            T = self.temperature
            p_t = torch.sigmoid(t_items / T)
            kd = (p_t * (F.logsigmoid(t_items / T) - F.logsigmoid(s_items / T))
                  + (1 - p_t) * (F.logsigmoid(-t_items / T) - F.logsigmoid(-s_items / T))).reshape(-1) * T * T
        else:
            T = self.temperature
            log_p_t = F.log_softmax(t_items / T, dim=-1)
            kd = (log_p_t.exp() * (log_p_t - F.log_softmax(s_items / T, dim=-1))).sum(-1) * T * T
        if lab is not None:
            target = lab[keep]
            if task == "regression":
                task_loss = ((s_items - target.to(s_items.dtype).view(s_items.shape)) ** 2).sum(-1)
            elif task == "multi_label_classification":
                task_loss = F.binary_cross_entropy_with_logits(s_items, target.to(s_items.dtype),
                                                               reduction="none").reshape(-1)
            else:
                task_loss = F.cross_entropy(s_items, target.long(), reduction="none")
            total = (self.alpha * kd + (1 - self.alpha) * task_loss).sum() / denom
            self.last = {"kd": kd.detach().mean(), "task": task_loss.detach().mean()}
        else:
            total = kd.sum() / denom
            self.last = {"kd": kd.detach().mean()}
        if self.hidden_weight > 0 and hidden:
            mse = self._hidden_mse(student, teacher, attention_mask)
            total = total + self.hidden_weight * mse * (n_items / denom)
            self.last["hidden"] = mse.detach()
        self.last["loss"] = total.detach()
        return total

    def _hidden_mse(self, student: Any, teacher: Any, attention_mask: torch.Tensor | None) -> torch.Tensor:
        hs, ht = _field(student, "hidden_states"), _field(teacher, "hidden_states")
        if hs is None or ht is None:
            raise ValueError(
                "hidden_weight > 0 needs hidden states from both models; call the student with "
                "output_hidden_states=True (attach() does this for Trainer runs)."
            )
        if isinstance(self.hidden_layers, dict):
            pairs = list(self.hidden_layers.items())
        elif self.hidden_layers == "all" and self._layer_map is not None:
            pairs = list(self._layer_map.items())
            if len(hs) != len(pairs) or max(t for _, t in pairs) >= len(ht):
                raise ValueError(
                    f"The student was cut from a teacher with layers {sorted(t - 1 for _, t in pairs[1:])} kept, but "
                    f"returns {len(hs)} hidden states against the teacher's {len(ht)}: distil it from the model "
                    "shallow_student() was called on, or give hidden_layers={student index: teacher index}."
                )
            last_s, last_t = pairs[-1]
            if self._teacher_norm is not None and last_t != len(ht) - 1:
                # the student's last state is after its final norm, the teacher's after that layer is not
                with torch.no_grad():
                    normed = self._teacher_norm(ht[last_t])
                ht = (*ht[:last_t], normed, *ht[last_t + 1:])
        elif self.hidden_layers == "all":
            if len(hs) != len(ht):
                raise ValueError(
                    f"Student returns {len(hs)} hidden states, teacher {len(ht)}; give hidden_layers=[...] indices "
                    "valid for both, or a dict {student index: teacher index}."
                )
            pairs = [(i, i) for i in range(len(hs))]
        elif self.hidden_layers == "last":
            pairs = [(-1, -1)]
        else:
            pairs = [(i, i) for i in self.hidden_layers]
        for i, j in pairs:
            if not (-len(hs) <= i < len(hs) and -len(ht) <= j < len(ht)):
                raise ValueError(
                    f"hidden_layers pairs student hidden state {i} with teacher hidden state {j}, but the student "
                    f"returns {len(hs)} and the teacher {len(ht)}."
                )
        terms = []
        for i, j in pairs:
            a, b = hs[i].float(), ht[j].to(device=hs[i].device, dtype=torch.float32)
            m = _mask_like(attention_mask, a).to(a.device)
            terms.append(((a - b) ** 2).mean(-1)[m].sum() / m.sum().clamp_min(1))
        return torch.stack(terms).mean()


def _mask_like(attention_mask: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    """A [B, L] boolean mask of real tokens for a [B, L, ...] tensor (all true without a mask)."""
    if attention_mask is None:
        return torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
    return attention_mask.to(x.device).bool()[:, : x.shape[1]]


def distillation_trainer(
    model: nn.Module,
    teacher: nn.Module,
    args: Any = None,
    *,
    temperature: float = 2.0,
    alpha: float = 0.5,
    hidden_weight: float = 0.0,
    hidden_layers: str | Sequence[int] | dict[int, int] = "all",
    task: str = "auto",
    teacher_device: str | torch.device | None = None,
    **trainer_kwargs: Any,
) -> Any:
    """A stock ``transformers.Trainer`` whose loss distils ``teacher`` into ``model``.

    Same as ``Trainer(model=model, args=args, compute_loss_func=DistillationLoss(teacher,
    ...).attach(model), **trainer_kwargs)``, plus the loss's ``accumulation_steps`` wired to the
    Trainer's (label-free data with gradient accumulation: see ``DistillationLoss.accumulation_steps``);
    the loss object is ``trainer.compute_loss_func``.
    """
    from transformers import Trainer

    if "compute_loss_func" in trainer_kwargs:
        raise ValueError(
            "distillation_trainer sets compute_loss_func itself; build the Trainer directly to use your own."
        )
    loss = DistillationLoss(
        teacher,
        temperature=temperature,
        alpha=alpha,
        hidden_weight=hidden_weight,
        hidden_layers=hidden_layers,
        task=task,
        teacher_device=teacher_device,
    ).attach(model)
    trainer = Trainer(model=model, args=args, compute_loss_func=loss, **trainer_kwargs)
    loss.accumulation_steps = lambda: getattr(trainer, "current_gradient_accumulation_steps", 1)
    return trainer
