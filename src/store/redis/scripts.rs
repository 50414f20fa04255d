//! The store's Lua scripts, and how they are called: by their SHA-1,
//! and by their source on a server that does not have them yet. Each
//! script makes one decision on one key atomically, where a sequence of
//! commands from the proxy could interleave with another proxy's.

use redis::{Cmd, FromRedisValue, RedisResult, Script};

use super::connection::Connection;

/// Writes `ARGV[2]` (or deletes when it is empty) only if the key still
/// holds `ARGV[1]` (empty: absent); `ARGV[3]` is the TTL in seconds, 0 for
/// none. Answers 1 when written, else what the key holds now (0: absent or
/// empty), so the caller can decide again without reading. The key is read
/// as the store's `get` reads it, up to byte `ARGV[4]`, one past the bound:
/// a longer value answers no more (the caller finds it past the bound), and
/// cannot equal `ARGV[1]`, which is within it.
const COMPARE_AND_SET: &str = r"
local current = redis.call('GETRANGE', KEYS[1], 0, ARGV[4])
if current ~= ARGV[1] then
  if current == '' then return 0 end
  return current
end
if ARGV[2] == '' then
  redis.call('DEL', KEYS[1])
elseif tonumber(ARGV[3]) > 0 then
  redis.call('SET', KEYS[1], ARGV[2], 'EX', ARGV[3])
else
  redis.call('SET', KEYS[1], ARGV[2])
end
return 1
";

/// Writes `ARGV[2]` with a TTL of `ARGV[3]` seconds (0: none) only if the
/// key holds a record of this store's layout (see [`super::Stored`]) at version
/// `ARGV[1]`, keeping the stored atime when it is later than the new one's
/// (a touch since the caller read it leaves the version). Answers 1 when
/// written as given, `{atime}` when written with the stored, later atime,
/// else what the key holds (0: absent or empty), read up to byte `ARGV[4]`
/// as in `COMPARE_AND_SET`. Atimes compare as digit strings: exact past
/// 2^53, where Lua's numbers are not.
const SET_IF_VERSION: &str = r#"
local current = redis.call('GETRANGE', KEYS[1], 0, ARGV[4])
if current == '' then return 0 end
local atime, ver = string.match(current, '^{"atime":(%d+),"created":%d+,"ip":"[^"]*","ver":(%d+),')
if ver ~= ARGV[1] then return current end
local new, answer = ARGV[2], 1
local written = string.match(new, '^{"atime":(%d+),')
if written and (#atime > #written or (#atime == #written and atime > written)) then
  new = '{"atime":' .. atime .. ',' .. string.sub(new, #written + 11)
  answer = {atime}
end
if tonumber(ARGV[3]) > 0 then
  redis.call('SET', KEYS[1], new, 'EX', ARGV[3])
else
  redis.call('SET', KEYS[1], new)
end
return answer
"#;

/// Moves the record's atime forward to `ARGV[1]` and refreshes the TTL
/// (`ARGV[2]`) in one step, without decoding the data: this store writes
/// `atime` first (see [`super::Stored`]). Answers 1 done, 0 absent, -1 a record in
/// another layout (the caller falls back to `modify`).
const TOUCH: &str = r#"
local current = redis.call('GET', KEYS[1])
if not current then return 0 end
local atime = string.match(current, '^{"atime":(%d+),')
if not atime then return -1 end
if tonumber(atime) < tonumber(ARGV[1]) then
  current = '{"atime":' .. ARGV[1] .. ',' .. string.sub(current, #atime + 11)
  if tonumber(ARGV[2]) > 0 then
    redis.call('SET', KEYS[1], current, 'EX', ARGV[2])
  else
    redis.call('SET', KEYS[1], current, 'KEEPTTL')
  end
elseif tonumber(ARGV[2]) > 0 then
  redis.call('EXPIRE', KEYS[1], ARGV[2])
end
return 1
"#;

/// Extends a lease (`ARGV[2]` ms) if it still holds our token `ARGV[1]`.
const LEASE_REFRESH: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
";

/// Deletes a lease if it still holds our token `ARGV[1]`.
const LEASE_RELEASE: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
";

/// Every script the store runs, hashed once.
pub(super) struct Scripts {
    pub(super) compare_and_set: Lua,
    pub(super) set_if_version: Lua,
    pub(super) touch: Lua,
    pub(super) lease_refresh: Lua,
    pub(super) lease_release: Lua,
}

impl Scripts {
    pub(super) fn new() -> Scripts {
        Scripts {
            compare_and_set: Lua::new(COMPARE_AND_SET),
            set_if_version: Lua::new(SET_IF_VERSION),
            touch: Lua::new(TOUCH),
            lease_refresh: Lua::new(LEASE_REFRESH),
            lease_release: Lua::new(LEASE_RELEASE),
        }
    }
}

/// One of the store's Lua scripts, called by its SHA-1 (`EVALSHA`).
pub(super) struct Lua {
    source: &'static str,
    hash: String,
}

impl Lua {
    fn new(source: &'static str) -> Lua {
        Lua {
            source,
            hash: Script::new(source).get_hash().to_owned(),
        }
    }

    /// A call of the script on `key`, `args` adding its `ARGV`.
    pub(super) fn call(&self, key: &str, args: impl FnOnce(&mut Cmd)) -> LuaCall {
        let mut by_hash = redis::cmd("EVALSHA");
        by_hash.arg(&self.hash).arg(1).arg(key);
        args(&mut by_hash);
        LuaCall {
            source: self.source,
            by_hash,
        }
    }
}

/// A prepared call of a [`Lua`] script.
pub(super) struct LuaCall {
    source: &'static str,
    by_hash: Cmd,
}

impl LuaCall {
    /// Runs the script by its hash or, on a server that does not have it
    /// (its first use there, a restart, a node a slot moved to), by its
    /// source, which also keeps it there: one round trip more, on the key's
    /// own node. Not the crate's `SCRIPT LOAD` then `EVALSHA`: on a cluster
    /// `SCRIPT LOAD` goes to every node, so one node down or hung failed
    /// the writes of sessions on the nodes that answer.
    pub(super) async fn invoke<T: FromRedisValue>(
        &self,
        connection: &mut Connection,
    ) -> RedisResult<T> {
        match self.by_hash.query_async(connection).await {
            Err(error) if error.code() == Some("NOSCRIPT") => {
                self.by_source().query_async(connection).await
            }
            outcome => outcome,
        }
    }

    /// `EVAL source` with the keys and arguments of the `EVALSHA hash`.
    fn by_source(&self) -> Cmd {
        let mut command = redis::cmd("EVAL");
        command.arg(self.source);
        for arg in self.by_hash.args_iter().skip(2) {
            if let redis::Arg::Simple(bytes) = arg {
                command.arg(bytes);
            }
        }
        command
    }
}
