"""Audio in and out around the engine (a layer above it: the engine never imports this):
speech via SpeechTokenizer + SoundStorm, music via EnCodec."""

from anygpt_engine.pipelines.speech import SpeechPipeline, StreamConfig

__all__ = ["SpeechPipeline", "StreamConfig"]
