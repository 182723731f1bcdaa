"""An independent float64 RWKV-7 in numpy, for tests only.

Written from ../shared/spec/rwkv7.md section 1.2, one token at a time, with
plain loops over heads; weights are read with gguf-py and dequantized with
``gguf.quants.dequantize`` -- nothing from rwkv_mlx is used, so agreement with
rwkv_mlx is evidence, not a tautology.  It is checked against the oracle's
ref64 logits in test_oracle.py before it is trusted for anything else.
"""

from __future__ import annotations

import math

import numpy as np
from gguf import GGUFReader
from gguf.quants import dequantize


class ReferenceRWKV7:
    def __init__(self, path):
        reader = GGUFReader(str(path))
        self.w = {}
        for t in reader.tensors:
            shape = tuple(int(d) for d in reversed(t.shape))
            self.w[t.name] = dequantize(t.data, t.tensor_type).astype(np.float64).reshape(shape)
        f = reader.fields
        self.C = int(f["rwkv7.embedding_length"].contents())
        self.L = int(f["rwkv7.block_count"].contents())
        self.N = int(f["rwkv7.wkv.head_size"].contents())
        self.H = self.C // self.N
        self.eps = float(f["rwkv7.attention.layer_norm_epsilon"].contents())

    def zero_state(self):
        return [
            (np.zeros(self.C), np.zeros(self.C), np.zeros((self.H, self.N, self.N)))
            for _ in range(self.L)
        ]

    @staticmethod
    def _ln(x, w, b, eps):
        mu = x.mean()
        var = ((x - mu) ** 2).mean()
        return (x - mu) / math.sqrt(var + eps) * w + b

    def step(self, token, state):
        """One token: returns (logits float64 [V], new state)."""
        W, C, H, N = self.w, self.C, self.H, self.N
        sig = lambda z: 1.0 / (1.0 + np.exp(-z))
        x = self._ln(W["token_embd.weight"][token], W["token_embd_norm.weight"], W["token_embd_norm.bias"], self.eps)
        v_first = None
        new_state = []
        for l in range(self.L):
            p = f"blk.{l}."
            sA, sF, S = state[l]
            xn = self._ln(x, W[p + "attn_norm.weight"], W[p + "attn_norm.bias"], self.eps)
            mu = W[p + "time_mix_lerp_fused.weight"].reshape(6, C)
            d = sA - xn
            xr, xw, xk, xv, xa, xg = (xn + d * mu[i] for i in range(6))
            r = W[p + "time_mix_receptance.weight"] @ xr
            k = W[p + "time_mix_key.weight"] @ xk
            v = W[p + "time_mix_value.weight"] @ xv
            z = W[p + "time_mix_w0.weight"] + W[p + "time_mix_w2.weight"] @ np.tanh(W[p + "time_mix_w1.weight"] @ xw)
            w = np.exp(-math.exp(-0.5) * sig(z))
            a = sig(W[p + "time_mix_a0.weight"] + W[p + "time_mix_a2.weight"] @ (W[p + "time_mix_a1.weight"] @ xa))
            if l == 0:
                v_first = v
            else:
                mix = sig(W[p + "time_mix_v0.weight"] + W[p + "time_mix_v2.weight"] @ (W[p + "time_mix_v1.weight"] @ xv))
                v = v + (v_first - v) * mix
            g = W[p + "time_mix_g2.weight"] @ sig(W[p + "time_mix_g1.weight"] @ xg)
            kk = k * W[p + "time_mix_k_k.weight"]
            k = k * (1 + (a - 1) * W[p + "time_mix_k_a.weight"])
            r_k = W[p + "time_mix_r_k.weight"].reshape(H, N)
            S_new = np.empty_like(S)
            out = np.empty(C)
            for h in range(H):
                sl = slice(h * N, (h + 1) * N)
                kkh = kk[sl] / max(np.linalg.norm(kk[sl]), 1e-12)
                alpha, beta = -kkh, kkh * a[sl]
                Sh = S[h]
                sa = Sh @ alpha
                Sh = Sh * w[sl][None, :] + np.outer(v[sl], k[sl]) + np.outer(sa, beta)
                y = Sh @ r[sl]
                S_new[h] = Sh
                mu_y = y.mean()
                var_y = ((y - mu_y) ** 2).mean()
                yn = (y - mu_y) / math.sqrt(var_y + 64e-5)
                yn = yn * W[p + "time_mix_ln.weight"][sl] + W[p + "time_mix_ln.bias"][sl]
                yn = yn + (r[sl] * k[sl] * r_k[h]).sum() * v[sl]
                out[sl] = yn
            x = x + W[p + "time_mix_output.weight"] @ (out * g)
            xf = self._ln(x, W[p + "attn_norm_2.weight"], W[p + "attn_norm_2.bias"], self.eps)
            xk2 = xf + (sF - xf) * W[p + "channel_mix_lerp_k.weight"]
            hid = np.maximum(W[p + "channel_mix_key.weight"] @ xk2, 0) ** 2
            x = x + W[p + "channel_mix_value.weight"] @ hid
            new_state.append((xn, xf, S_new))
        logits = W["output.weight"] @ self._ln(x, W["output_norm.weight"], W["output_norm.bias"], self.eps)
        return logits, new_state

    def run(self, tokens, state=None):
        state = state or self.zero_state()
        out = []
        for t in tokens:
            logits, state = self.step(t, state)
            out.append(logits)
        return np.stack(out), state
