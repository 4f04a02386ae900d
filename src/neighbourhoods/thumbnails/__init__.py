"""What the thumbnail verbs (`generate`, `serve`, `export`) share: one request is (city, seed,
size, format) and always yields the same bytes.

    source.py       Source: class names, resolution and a deterministic sampler, from a run or
                    an exported file (load_source); the weights fingerprint that names a model
    exported.py     reading an exported generator (.pt2 + .json), without the models code
    guard.py        the novelty guard: near-copies of training photos replaced by the sample of
                    the next derived seed (render_samples), so the replacement is deterministic
    upscalers.py    from the generator's resolution to thumbnail size: resampling filters and
                    the small SR network (get_upscaler); crop to fill (cover_box)
    postprocess.py  formats, encoding, thumbnail(): upscale, crop and encode one sample

Sizes are core.resolution.ThumbSize (WxH, web convention), unlike training resolutions (HxW).
"""
