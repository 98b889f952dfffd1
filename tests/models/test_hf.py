"""pararnn.hf: transformers' Auto classes, safetensors, generate with the recurrent state as the
cache (greedy, sampling, left-padded batches) and a Trainer run, all offline and tiny."""
import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")  # the Trainer's

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM  # noqa: E402

from pararnn.hf import PararnnConfig, PararnnForCausalLM, PararnnModel  # noqa: E402

V = 40


def tiny(cell="paragru", **kw) -> PararnnForCausalLM:
    torch.manual_seed(0)
    return PararnnForCausalLM(PararnnConfig(vocab_size=V, hidden_size=16, num_hidden_layers=2, cell=cell, **kw)).eval()


def sequential_decode(model, ids: torch.Tensor, new: int) -> torch.Tensor:
    """Greedy tokens from a fully sequential pass: every prompt token, then every new one, by one step."""
    state = [torch.zeros(ids.shape[0], layer.cell.state_size) for layer in model.model.layers]
    out = []
    with torch.no_grad():
        for t in range(ids.shape[1] + new - 1):
            token = ids[:, t] if t < ids.shape[1] else out[-1]
            o = model(token[:, None], state=state, use_cache=True)
            state = o.state
            if t >= ids.shape[1] - 1:
                out.append(o.logits[:, -1].argmax(-1))
    return torch.stack(out, 1)


def test_auto_classes_and_safetensors_round_trip(tmp_path):
    model = tiny()
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file() and not list(tmp_path.glob("*.bin"))
    assert isinstance(AutoConfig.from_pretrained(tmp_path), PararnnConfig)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    base = AutoModel.from_pretrained(tmp_path)
    assert isinstance(loaded, PararnnForCausalLM) and isinstance(base, PararnnModel)
    ids = torch.randint(0, V, (2, 20))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=0)
        torch.testing.assert_close(base(ids).last_hidden_state, model.model(ids).last_hidden_state, rtol=0, atol=0)


@pytest.mark.parametrize("cell", ["paragru", "lstm", "deltanet"])
def test_greedy_generate_equals_a_fully_sequential_decode(cell):
    """The prompt is prefilled in one parallel solve, then each token decoded with the state."""
    model = tiny(cell)
    ids = torch.randint(0, V, (3, 17))
    tokens = model.generate(ids, max_new_tokens=8, do_sample=False)
    assert tokens.shape == (3, 25) and torch.equal(tokens[:, :17], ids)
    assert torch.equal(tokens[:, 17:], sequential_decode(model, ids, 8))


def test_left_padded_batch_generates_as_each_prompt_alone():
    model = tiny()
    a, b = torch.randint(1, V, (1, 9)), torch.randint(1, V, (1, 14))
    batch = torch.cat([torch.cat([torch.zeros(1, 5, dtype=torch.long), a], 1), b])  # [2, 14], row 0 left-padded
    mask = torch.ones_like(batch)
    mask[0, :5] = 0
    out = model.generate(batch, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(out[0, 14:], model.generate(a, max_new_tokens=6, do_sample=False)[0, 9:])
    assert torch.equal(out[1, 14:], model.generate(b, max_new_tokens=6, do_sample=False)[0, 14:])


def test_sampling_is_seeded_and_respects_top_k():
    model = tiny()
    ids = torch.randint(0, V, (2, 10))
    runs = []
    for _ in range(2):
        torch.manual_seed(3)
        runs.append(model.generate(ids, max_new_tokens=6, do_sample=True, top_k=3, top_p=0.95, temperature=0.7))
    assert torch.equal(*runs) and runs[0].shape == (2, 16)
    with torch.no_grad():  # the first sampled token is among the prompt's top 3
        top3 = model(ids).logits[:, -1].topk(3).indices
    assert all(int(runs[0][i, 10]) in top3[i].tolist() for i in range(2))


def test_right_padding_and_bad_masks():
    model = tiny()
    ids = torch.randint(0, V, (2, 12))
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    with torch.no_grad():
        out = model(ids, attention_mask=mask, use_cache=True)
        alone = model(ids[1:, :7], use_cache=True)
    torch.testing.assert_close(out.logits[1, :7], alone.logits[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out.state[0][1], alone.state[0][0], rtol=1e-4, atol=1e-5)
    holes = torch.ones_like(ids)
    holes[0, 5] = 0
    with pytest.raises(ValueError, match="left padding .* or right padding"):
        model(ids, attention_mask=holes)
    with pytest.raises(ValueError, match="no token"):
        model(ids, attention_mask=torch.zeros_like(ids))
    with pytest.raises(ValueError, match="cell must be one of"):
        PararnnConfig(cell="transformer")


@pytest.mark.parametrize("reentrant", [False, True])
def test_activation_checkpointing_gives_the_same_loss_and_gradients(reentrant):
    """transformers' activation_checkpointing_enable (the Trainer's gradient_checkpointing=True):
    each block runs under transformers' checkpoint function, and a first training step (the
    solver's one-off cell probe inside the checkpoint) gives the plain model's loss and gradients."""
    plain, checkpointed = tiny().train(), tiny().train()
    checkpointed.activation_checkpointing_enable({"use_reentrant": reentrant})
    calls, checkpoint_func = [], checkpointed.model._gradient_checkpointing_func

    def counted(*args, **kwargs):
        calls.append(1)
        return checkpoint_func(*args, **kwargs)

    checkpointed.model._gradient_checkpointing_func = counted
    ids = torch.randint(0, V, (2, 24))
    losses, grads = [], []
    for model in (plain, checkpointed):
        loss = model(ids, labels=ids).loss
        loss.backward()
        losses.append(loss.detach())
        grads.append([p.grad for p in model.parameters()])
    assert len(calls) == 2  # one checkpoint per block
    torch.testing.assert_close(losses[1], losses[0])
    for a, b in zip(grads[1], grads[0], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_trainer_loss_equals_a_plain_loop_and_its_save_loads(tmp_path):
    from transformers import Trainer, TrainingArguments

    torch.manual_seed(1)
    data = torch.randint(0, V, (8, 24))  # a tiny corpus, made here
    dataset = [{"input_ids": row, "labels": row} for row in data]
    args = TrainingArguments(output_dir=str(tmp_path / "run"), per_device_train_batch_size=8, max_steps=3,
                             learning_rate=1e-2, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
                             max_grad_norm=0.0, optim="adamw_torch", logging_steps=1, save_strategy="no",
                             report_to=[], use_cpu=True, seed=0, disable_tqdm=True)
    model = tiny().train()
    plain = tiny().train()
    trainer = Trainer(model=model, args=args, train_dataset=dataset)
    trainer.train()
    hf_losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    opt = torch.optim.AdamW(plain.parameters(), lr=1e-2, weight_decay=0.0)
    losses = []
    for _ in range(3):
        loss = plain(data, labels=data).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert len(hf_losses) == 3
    torch.testing.assert_close(torch.tensor(hf_losses), torch.tensor(losses), rtol=0, atol=2e-4)
    assert losses[-1] < losses[0]
    trainer.save_model(str(tmp_path / "saved"))
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "saved").eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(data).logits, model.eval()(data).logits, rtol=0, atol=0)
