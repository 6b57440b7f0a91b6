"""Benchmark: closed-form products of a GPT-2 attention half against vmapped autograd.

The section is ``x -> x + attn(ln_1(x))`` of a transformers ``GPT2Block``
(GPT-2 small's shape: d = 768, 12 heads, random init, float64, one sample of
``--T`` positions). Its products ``V^T J`` for ``k = --k`` random cotangent
columns and ``--m`` random combinations of the output positions (``m k``
directions) are computed two ways in the same run:

* closed form: :meth:`~sklearn_lib.models._attention_half.NormAttention.products`
  of the section read from the block, in chunks sized from its ``costs()`` and
  ``--memory``;
* autograd: ``torch.func.vjp`` of the real module's section and ``torch.func.vmap``
  over chunks of ``--autograd-chunk`` cotangents (what
  :class:`~sklearn_lib.models._vjp.SectionProducts` does), eager attention with
  an explicit causal mask.

Each chunk is consumed as the interaction statistics would: its scatter ``P^T
P`` is summed. Reported: the time of each (products alone and with the
scatter; the fastest of ``--repeat`` interleaved rounds, as the machine may be
shared), peak resident memory above the start, the largest relative
differences between the two (the first 16 directions elementwise, a random
projection of every product, the scatter), this machine's float64 GEMM rate and the
closed form's useful rate (``2 m k T d^2`` flops of its main GEMM per second).
``--m 0`` takes exact positions instead (``T k`` directions, one-hot cotangents).

Usage::

    python benchmarks/bench_attention_half.py                 # T = 256, 2 threads
    python benchmarks/bench_attention_half.py --repeat 3      # on a shared machine
    python benchmarks/bench_attention_half.py --T 1024 --autograd-chunk 16 --memory 2147483648
    python benchmarks/bench_attention_half.py --m 0 --T 32 --k 64    # exact positions
    python benchmarks/bench_attention_half.py --device cuda --T 1024
"""

import argparse
import time
from pathlib import Path

import torch

from sklearn_lib.models._attention_half import NormAttention
from sklearn_lib.models._norms import Norm

try:
    from _memory import peak, reset_peak
except ImportError:  # run from elsewhere than benchmarks/
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from _memory import peak, reset_peak


def gemm_rate(device, size=2048, repeat=3):
    a = torch.randn(size, size, dtype=torch.float64, device=device)
    b = torch.randn(size, size, dtype=torch.float64, device=device)
    times = []
    for _ in range(repeat + 1):
        _sync(device)
        t0 = time.perf_counter()
        a @ b
        _sync(device)
        times.append(time.perf_counter() - t0)
    return 2 * size**3 / min(times[1:])


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def gpt2_block(device):
    import transformers

    config = transformers.GPT2Config(n_layer=1, n_embd=768, n_head=12, n_positions=2048,
                                     vocab_size=10)
    config._attn_implementation = "eager"
    model = transformers.GPT2Model(config).to(device=device, dtype=torch.float64).eval()
    return model.h[0]


def formula_of(blk):
    """The block's attention half as a NormAttention (Conv1D weights are (in, out))."""
    attn, d = blk.attn, blk.attn.embed_dim
    W, b = attn.c_attn.weight.detach(), attn.c_attn.bias.detach()
    ln = blk.ln_1
    return NormAttention(
        Norm("layer", ln.weight.detach(), ln.bias.detach(), ln.eps),
        W[:, :d].T, b[:d], W[:, d : 2 * d].T, b[d : 2 * d], W[:, 2 * d :].T, b[2 * d :],
        attn.c_proj.weight.detach().T, attn.c_proj.bias.detach(), attn.num_heads,
        attn.num_heads, attn.scaling, None, True, True)


def module_section(blk, T, device):
    """``x -> x + attn(ln_1(x))`` through the module itself (eager, additive causal mask)."""
    mask = torch.full((T, T), float("-inf"), dtype=torch.float64, device=device).triu_(1)
    mask = mask[None, None]

    def section(x):
        return x + blk.attn(blk.ln_1(x), attention_mask=mask)[0]

    return section


def consume(chunks, device, z):
    """Sum each chunk's scatter; return (products' s, total s, scatter, sketch, first)."""
    scatter, sketch, first = None, [], None
    t_products = 0.0
    _sync(device)
    t0 = time.perf_counter()
    it = iter(chunks)
    while True:
        t1 = time.perf_counter()
        try:
            P = next(it)
        except StopIteration:
            break
        _sync(device)
        t_products += time.perf_counter() - t1
        flat = P.reshape(-1, P.shape[-1])
        scatter = flat.T @ flat if scatter is None else scatter.addmm_(flat.T, flat)
        sketch.append(P @ z)
        if first is None:
            first = P[:16].clone()  # not the whole chunk: it would count in the peak
    _sync(device)
    return t_products, time.perf_counter() - t0, scatter, torch.cat(sketch), first


def chunk_size(section, X, V, signs, memory):
    """Half of ``memory`` for the temporaries of a chunk, half for its products."""
    products = section.products([X], V, signs=signs, memory=memory // 2)
    _, _, per_vector = products.costs()
    return max(1, min(products.n_vectors, memory // 2 // per_vector))


def closed_form_chunks(section, X, V, signs, memory):
    products = section.products([X], V, signs=signs, memory=memory // 2)
    step = chunk_size(section, X, V, signs, memory)
    for _, chunk in products.chunks(step):
        yield chunk


def autograd_chunks(fn, X, V, signs, step):
    with torch.no_grad():
        _, vjp_fn = torch.func.vjp(fn, X)
        k = V.shape[1]
        if signs is None:
            # Exact positions: direction q = t * k + c is one-hot at output position t.
            signs = torch.eye(X.shape[1], dtype=X.dtype, device=X.device)[None]
        m = signs.shape[1]
        for start in range(0, m * k, step):
            q = torch.arange(start, min(start + step, m * k), device=X.device)
            # Direction q = j * k + c: combination j's signs over positions times column c.
            cot = signs[:, q // k].transpose(0, 1)[..., None] * V.T[q % k][:, None, None, :]
            yield torch.func.vmap(lambda v: vjp_fn(v)[0])(cot).reshape(len(q), -1, X.shape[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--T", type=int, default=256)
    parser.add_argument("--k", type=int, default=768)
    parser.add_argument("--m", type=int, default=1,
                        help="combinations of positions; 0: exact positions (T k directions)")
    parser.add_argument("--memory", type=int, default=2**29,
                        help="bytes for the closed form's chunks (default 512 MiB)")
    parser.add_argument("--autograd-chunk", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--skip-autograd", action="store_true")
    parser.add_argument("--repeat", type=int, default=1,
                        help="interleaved rounds; the fastest of each is reported")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device, T, dt = args.device, args.T, torch.float64
    cuda = torch.device(device).type == "cuda"

    blk = gpt2_block(device)
    section, fn = formula_of(blk), module_section(blk, T, device)
    d = section.d_in
    X = torch.randn(1, T, d, dtype=dt, device=device)
    V = torch.randn(d, args.k, dtype=dt, device=device)
    signs = None
    if args.m > 0:
        signs = (torch.randint(0, 2, (1, args.m, T), device=device) * 2 - 1).to(dt)
        signs /= args.m**0.5
    n_vectors = (args.m or T) * args.k
    z = torch.randn(d, dtype=dt, device=device)
    with torch.no_grad():
        fwd = float((section.forward(X) - fn(X)).abs().max() / fn(X).abs().max())
    rate = gemm_rate(device)
    print(f"device {device}, threads {torch.get_num_threads()}, T={T}, d={d}, heads=12, "
          f"k={args.k}, m={args.m or 'exact'}: {n_vectors} directions, float64")
    print(f"forward: formula vs module max rel diff {fwd:.1e}")
    print(f"float64 GEMM rate (2048^3): {rate / 1e9:.1f} GFLOP/s")
    print(f"chunks: closed form {chunk_size(section, X, V, signs, args.memory)} directions, "
          f"autograd {args.autograd_chunk}")

    results = {}
    runs = [("closed form", lambda: closed_form_chunks(section, X, V, signs, args.memory))]
    if not args.skip_autograd:
        runs.append(("autograd", lambda: autograd_chunks(fn, X, V, signs,
                                                         args.autograd_chunk)))
    # Interleaved rounds, the fastest of each kept: the machine may be shared.
    for _ in range(args.repeat):
        for name, make in runs:
            if cuda:
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
            else:
                base = reset_peak()
            t_products, t_total, scatter, sketch, first = consume(make(), device, z)
            used = (torch.cuda.max_memory_allocated() if cuda else peak()) - base
            if name in results:
                t_products = min(t_products, results[name][0])
                t_total = min(t_total, results[name][1])
                used = max(used, results[name][5])
            results[name] = (t_products, t_total, scatter, sketch, first, used)
    for name, (t_products, t_total, *_, used) in results.items():
        print(f"{name:12s} products {t_products:7.2f} s, with scatter {t_total:7.2f} s, "
              f"peak {used / 2**20:7.0f} MiB {'(CUDA allocated)' if cuda else '(RSS)'}")
    t_closed = results["closed form"][0]
    if signs is not None:
        flops = 2 * n_vectors * T * d * d
        print(f"closed form: {flops / t_closed / 1e9:.1f} GFLOP/s of its main GEMM "
              f"(2 m k T d^2 = {flops / 1e9:.0f} GFLOP), {flops / rate / t_closed:.2f} of "
              "the GEMM rate")
    if "autograd" in results:
        a, c = results["autograd"], results["closed form"]

        def rel(i):
            n = min(len(c[i]), len(a[i]))  # the first chunks may differ in size
            return float((c[i][:n] - a[i][:n]).abs().max() / a[i][:n].abs().max())

        print(f"speed-up: products {a[0] / c[0]:.1f}x, with scatter {a[1] / c[1]:.1f}x")
        print(f"max rel diff: first 16 directions {rel(4):.1e}, projections of all products "
              f"{rel(3):.1e}, scatter {rel(2):.1e}")


if __name__ == "__main__":
    main()
