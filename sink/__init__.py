"""sink: assembles output/error files from responses and seals them when a batch finalizes."""
