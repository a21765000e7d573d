"""GPT-2 small's parameter shapes, the one table every benchmark uses."""

from __future__ import annotations


def gpt2_small_shapes(layers: int = 12, width: int = 768, vocab: int = 50257,
                      context: int = 1024) -> dict[str, tuple[int, ...]]:
    """The 148 parameter tensors of GPT-2 small (124,439,808 parameters), by name.

    Hugging Face's layout: token and position embeddings, ``layers`` blocks
    (two LayerNorms, attention and MLP projections), a final LayerNorm.
    """
    shapes = {"wte": (vocab, width), "wpe": (context, width)}
    for i in range(layers):
        shapes |= {
            f"h{i}.ln_1.w": (width,), f"h{i}.ln_1.b": (width,),
            f"h{i}.attn.c_attn.w": (width, 3 * width), f"h{i}.attn.c_attn.b": (3 * width,),
            f"h{i}.attn.c_proj.w": (width, width), f"h{i}.attn.c_proj.b": (width,),
            f"h{i}.ln_2.w": (width,), f"h{i}.ln_2.b": (width,),
            f"h{i}.mlp.c_fc.w": (width, 4 * width), f"h{i}.mlp.c_fc.b": (4 * width,),
            f"h{i}.mlp.c_proj.w": (4 * width, width), f"h{i}.mlp.c_proj.b": (width,),
        }
    return shapes | {"ln_f.w": (width,), "ln_f.b": (width,)}
