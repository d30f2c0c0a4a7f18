"""The data contracts: one module owns each format that more than one job reads or writes.

    catalog      what a catalog row is, which rows are rejected and why, the content hash
    embeddings   embedding parts, their manifest, live rows, verified reads
    vectors      which embedding rows are usable index vectors, and their int64 ids
    index_codec  the stored form of an index shard (faiss inverted lists) and the trained index
    index_version  a published version: its files, manifest, the LATEST pointer, version names
    model        the model description every manifest carries
    files        Parquet files named in every error, with their checksums
    recall       recall@k, the one definition every report uses

Jobs (pipelines/) import these and never each other's internals; nothing here imports a
job. See docs/architecture.md for the layering and the flow of one product through it.
"""
