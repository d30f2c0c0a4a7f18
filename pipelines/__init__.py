"""mimdex.pipelines."""
