"""The dry run (`--dry_run`): the train step compiled abstractly for this
machine or a device it lacks, its memory and FLOPs, and what would fit."""
