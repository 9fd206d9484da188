"""Discrete codecs: SpeechTokenizer and EnCodec (wav <-> codes), the SEED image tokenizer
(images <-> codes -> unCLIP embedding -> picture), codebook loaders for real
checkpoints (SpeechTokenizer, EnCodec, SEED) and helpers between codec codes and AnyGPT token
ids. The RVQ arithmetic itself is ops.rvq."""

from anygpt_engine.codecs.encodec import Encodec
from anygpt_engine.codecs.loaders import (encodec_codebooks, load_state_dict, seed_codebook,
                                          speechtokenizer_codebooks, stack_codebooks)
from anygpt_engine.codecs.seed import SeedImageTokenizer
from anygpt_engine.codecs.speechtokenizer import SpeechTokenizer
from anygpt_engine.codecs.tokens import (image_codes, image_tokens, music_codes, music_tokens, speech_codes,
                                         speech_tokens)
from anygpt_engine.ops.rvq import RVQCodebooks

__all__ = [
    "Encodec", "RVQCodebooks", "SeedImageTokenizer", "SpeechTokenizer", "encodec_codebooks", "image_codes",
    "image_tokens", "load_state_dict", "music_codes", "music_tokens", "seed_codebook", "speech_codes", "speech_tokens",
    "speechtokenizer_codebooks", "stack_codebooks",
]
