#!/usr/bin/env python3
"""moto server with Kinesis resharding made to behave as AWS documents it.

moto 5.2.5 gets resharding wrong in ways that hide exactly the bugs a consumer must not have:
- SplitShard moves the parent's records into the children (so a consumer that already read the parent reads
  them again, under new sequence numbers) and MergeShards copies them (read twice);
- a closed shard never ends: GetRecords keeps returning a NextShardIterator, so "read to the end" cannot be
  observed;
- PutRecord still routes to closed shards (hash ranges of closed shards are matched, first match wins).

AWS (Kinesis developer guide, "Resharding a stream" and GetRecords): a parent keeps its records until they
expire and becomes CLOSED; new records go to the children; GetRecords on a closed shard returns a null
NextShardIterator once its last record was returned. This wrapper patches those three points and then runs the
normal moto server with the same command line (`moto_server.py -H 127.0.0.1 -p 0`).
"""
import sys

from moto.kinesis import models as km
from moto.kinesis.utils import decompose_shard_iterator


def get_shard_for_key(self, partition_key, explicit_hash_key):
    if explicit_hash_key:
        key = int(explicit_hash_key)
        if key >= 2**128:
            raise km.InvalidArgumentError("explicit_hash_key")
    else:
        key = int(km.md5_hash(partition_key.encode("utf-8")).hexdigest(), 16)
    for shard in self.shards.values():
        if shard.is_open and shard.starting_hash <= key <= shard.ending_hash:
            return shard
    return None


def split_shard(self, shard_to_split, new_starting_hash_key):
    new_start = int(new_starting_hash_key)
    shard = self.shards[shard_to_split]
    if not (shard.starting_hash < new_start < shard.ending_hash) or not shard.is_open:
        raise km.InvalidArgumentError(message=f"cannot split {shard_to_split} at {new_start}")
    last_id = max(s._shard_id for s in self.shards.values())
    a = km.Shard(last_id + 1, shard.starting_hash, new_start - 1, parent=shard.shard_id)
    b = km.Shard(last_id + 2, new_start, shard.ending_hash, parent=shard.shard_id)
    shard.is_open = False
    self.shards[a.shard_id] = a
    self.shards[b.shard_id] = b


def merge_shards(self, shard_to_merge, adjacent_shard_to_merge):
    s1, s2 = self.shards[shard_to_merge], self.shards[adjacent_shard_to_merge]
    if s1.ending_hash + 1 == s2.starting_hash:
        lo, hi = s1, s2
    elif s2.ending_hash + 1 == s1.starting_hash:
        lo, hi = s2, s1
    else:
        raise km.InvalidArgumentError(adjacent_shard_to_merge)
    if not (s1.is_open and s2.is_open):
        raise km.InvalidArgumentError("shard already closed")
    last_id = max(s._shard_id for s in self.shards.values())
    new = km.Shard(last_id + 1, lo.starting_hash, hi.ending_hash, parent=s1.shard_id, adjacent_parent=s2.shard_id)
    s1.is_open = False
    s2.is_open = False
    self.shards[new.shard_id] = new


_get_records = km.KinesisBackend.get_records


def get_records(self, stream_arn, shard_iterator, limit):
    next_iterator, records, millis = _get_records(self, stream_arn, shard_iterator, limit)
    stream_name, shard_id, last = decompose_shard_iterator(next_iterator)
    shard = self.describe_stream(stream_arn=stream_arn, stream_name=stream_name).get_shard(shard_id)
    if not shard.is_open and int(last) >= shard.get_max_sequence_number():
        next_iterator = None
    return next_iterator, records, millis


km.Stream.get_shard_for_key = get_shard_for_key
km.Stream.split_shard = split_shard
km.Stream.merge_shards = merge_shards
km.KinesisBackend.get_records = get_records

if __name__ == "__main__":
    from moto.server import main

    sys.exit(main(sys.argv[1:]))
