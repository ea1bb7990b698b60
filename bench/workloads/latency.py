"""Lua for the bench clients that time round trips: the waits are counted in buckets of 1 µs, as
redis-benchmark's histogram counts them, rather than kept in a list. A list of every wait grows
the client's heap through the run, and its garbage collector's work with it, so the client would
measure itself; the percentiles are read from the buckets after the run's time and CPU are taken."""

HISTOGRAM = """
local function count_wait(histogram, seconds)  -- one more wait of `seconds`
  local bucket = seconds * 1e6 // 1
  histogram[bucket] = (histogram[bucket] or 0) + 1
end
local function quantile_us(histogram, p)  -- the upper edge (µs) of the bucket holding the p-quantile
  local buckets, total = {}, 0
  for bucket, n in pairs(histogram) do buckets[#buckets + 1] = bucket; total = total + n end
  table.sort(buckets)
  local need, seen = math.max(1, math.ceil(total * p)), 0
  for _, bucket in ipairs(buckets) do
    seen = seen + histogram[bucket]
    if seen >= need then return bucket + 1 end
  end
  return 0
end
"""
