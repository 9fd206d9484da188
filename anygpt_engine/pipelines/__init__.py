"""Audio in and out around the engine (a layer above it: the engine never imports this):
speech via SpeechTokenizer + SoundStorm, music via EnCodec, and token streams that let audio
start before a reply is complete."""

from anygpt_engine.pipelines.engine_stream import stream_tokens
from anygpt_engine.pipelines.music import MusicPipeline
from anygpt_engine.pipelines.speech import SpeechPipeline, StreamConfig

__all__ = ["MusicPipeline", "SpeechPipeline", "StreamConfig", "stream_tokens"]
