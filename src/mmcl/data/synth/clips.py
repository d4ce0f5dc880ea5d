"""Video clips for the offline world: frame sequences encoded as small, lossless, byte-stable video files (PyAV).

The clips are QuickTime (.mov) files of PNG-coded frames (FFmpeg's png encoder and mov muxer, both bundled with the
PyAV wheel): lossless, so a small shape keeps its exact colour (4:2:0 H.264 would smear it), and with the bitexact
flags on the codec and the muxer no version string or timestamp makes two writes differ — the same frames always
give the same bytes. Lossless H.264 (libx264rgb, qp 0) is byte-stable too but four times slower to write (x264's
set-up dominates a 6-frame clip). Every FFmpeg-based reader (PyAV, ffmpeg, most players) opens them; the model's
`load_video` reads them exactly as it reads real MP4/WebM/MKV files.
"""

from __future__ import annotations

import io

from PIL import Image

FPS = 4


SUFFIX = ".mov"


def clip_bytes(frames: list[Image.Image], fps: int = FPS) -> bytes:
    """Encode equal-sized RGB frames as a lossless PNG-in-QuickTime clip, deterministically."""
    import av

    if not frames:
        raise ValueError("a clip needs at least one frame")
    buf = io.BytesIO()
    with av.open(buf, "w", format="mov", options={"fflags": "+bitexact"}) as container:
        stream = container.add_stream("png", rate=fps, options={"flags": "+bitexact"})
        stream.width, stream.height = frames[0].size
        stream.pix_fmt = "rgb24"
        for img in frames:
            for packet in stream.encode(av.VideoFrame.from_image(img.convert("RGB"))):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buf.getvalue()
