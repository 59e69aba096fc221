"""Input discovery/reading, safe HTTP fetching, image decoding and shard writing."""
