"""The passive-mode caching proxy (SPEC §5): serves only files a published index lists, fetching
each from upstream once, verifying it, and storing it through mirrorgen.store. Not built yet;
`mirrorgen proxy` exits 2 until it is."""
