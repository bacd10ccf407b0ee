"""Data: sources (synthetic, MovieLens, CSV/Parquet), cleaning and the split, partitioning into
tenants, tenant vaults (``prepare``)."""
