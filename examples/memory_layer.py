"""NeuralMemory as a layer in your own MLX model, trained end to end, with its state carried across calls.

A toy model (embedding -> memory -> output, no attention) sees random key-value pairs in one call, then the same
keys again in a second call that continues the first through the memory's state, and must recall each value.
Only the memory can carry the pairs from the first call to the second. The paper's short convolution
(conv_size=4) lets a stored key come from the token before its value.

    python examples/memory_layer.py
"""

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np

from mlx_titans import MemoryConfig, NeuralMemory

VOCAB, DIM, PAIRS = 64, 64, 8


class RecallModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, DIM)
        self.memory = NeuralMemory(MemoryConfig(dim=DIM, heads=2, chunk_size=4, max_lr=0.5, conv_size=4))
        self.norm = nn.RMSNorm(DIM)
        self.out = nn.Linear(DIM, VOCAB)

    def __call__(self, tokens, state=None):
        x = self.embed(tokens)
        read, state = self.memory(x, state)  # state=None starts a new stream
        return self.out(self.norm(x + read)), state


def batch(rng, size=32):
    """(key, value) tokens to store, then (key, value) of the same pairs in another order to recall."""
    keys = np.stack([rng.choice(VOCAB // 2, PAIRS, replace=False) for _ in range(size)])
    values = rng.integers(VOCAB // 2, VOCAB, (size, PAIRS))
    order = np.stack([rng.permutation(PAIRS) for _ in range(size)])
    store = np.stack([keys, values], -1).reshape(size, -1)
    recall = np.stack([np.take_along_axis(keys, order, 1), np.take_along_axis(values, order, 1)], -1)
    return mx.array(store), mx.array(recall.reshape(size, -1))


def loss_fn(model, store, recall):
    _, state = model(store)  # first call: the pairs go into the memory
    logits, _ = model(recall[:, :-1], state)  # second call continues the stream
    is_key = mx.arange(recall.shape[1] - 1) % 2 == 0  # after a key comes its value
    per_token = nn.losses.cross_entropy(logits, recall[:, 1:])
    return (per_token * is_key).sum() / (is_key.sum() * recall.shape[0])


def main():
    mx.random.seed(0)
    rng = np.random.default_rng(0)
    model = RecallModel()
    opt = optim.AdamW(3e-3)
    step = nn.value_and_grad(model, loss_fn)
    for i in range(400):
        loss, grads = step(model, *batch(rng))
        opt.update(model, grads)
        mx.eval(model.parameters(), opt.state)
        if i % 50 == 0 or i == 399:
            print(f"step {i:3d}  recall loss {loss.item():.3f}  (chance {np.log(VOCAB // 2):.3f})")


if __name__ == "__main__":
    main()
