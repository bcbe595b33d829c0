/* Wire constants of the agent protocol. Mirrored by hypemand/guest/protocol.py; see guest/README.md.
 *
 * Frame: u32 payload_len | u32 session | u8 type | payload   (all integers big-endian)
 */
#ifndef HYPEMAN_AGENT_PROTO_H
#define HYPEMAN_AGENT_PROTO_H

#define AP_VERSION 1
#define AP_MAGIC "HYPEMAN!" /* 8 bytes, first field of HELLO and HELLO_ACK */
#define AP_MAGIC_LEN 8
#define AP_HEADER_LEN 9
#define AP_MAX_PAYLOAD 65536
/* Per session and direction, how many data bytes may be in flight before the receiver grants more. */
#define AP_INITIAL_WINDOW (256 * 1024)
/* Nonce of the HELLO_ACK an agent sends unasked when it starts: a host that finished its handshake
 * learns that the agent was restarted (its sessions are gone) and says HELLO again. Hosts never
 * use this nonce in their HELLOs. */
#define AP_AGENT_STARTED_NONCE 0

/* host -> guest */
#define AP_PAD 0x00         /* ignored; all-zero filler the host sends to resynchronise */
#define AP_HELLO 0x01       /* magic8 u32 version u64 nonce */
#define AP_PING 0x02        /* u64 token -> PONG */
#define AP_EXEC 0x10        /* see README */
#define AP_STDIN 0x11       /* data (window-counted) */
#define AP_STDIN_EOF 0x12   /* - */
#define AP_RESIZE 0x13      /* u16 rows u16 cols */
#define AP_SIGNAL 0x14      /* u8 signo */
#define AP_PUT 0x20         /* u32 mode i32 uid i32 gid u8 flags i64 mtime_ns path\0 */
#define AP_FILE_DATA 0x21   /* data (window-counted), both directions */
#define AP_FILE_END 0x22    /* - */
#define AP_MKDIR 0x23       /* u32 mode i32 uid i32 gid u8 flags i64 mtime_ns path\0 */
#define AP_SYMLINK 0x24     /* i32 uid i32 gid u8 flags target\0 path\0 */
#define AP_GET 0x25         /* u8 flags path\0 */
#define AP_STAT 0x26        /* u8 flags path\0 */
#define AP_SET_CLOCK 0x30   /* i64 unix_ns */
#define AP_IDENTITY 0x31    /* u16 entropy_len entropy u8 mac_len(0|6) mac hostname\0
                               [u8 net_len(0|9) u32 ip u8 prefix u32 gateway] -> OK {u8 done} */
#define AP_WINDOW 0x40      /* u32 increment (both directions) */
#define AP_CANCEL 0x41      /* - : host abandons the session */

/* guest -> host */
#define AP_HELLO_ACK 0x81   /* magic8 u32 version u64 nonce u32 max_payload u32 initial_window */
#define AP_PONG 0x82        /* u64 token */
#define AP_STARTED 0x90     /* u32 pid */
#define AP_STDOUT 0x91      /* data (window-counted) */
#define AP_STDERR 0x92      /* data (window-counted) */
#define AP_EXIT 0x93        /* u8 kind(0 exited,1 signaled) i32 value u8 timed_out */
#define AP_PUT_DONE 0xA0    /* u64 bytes_written */
#define AP_ENTRY 0xA1       /* u8 type u32 mode u64 size i64 mtime_ns u32 uid u32 gid relpath\0 link\0 */
#define AP_ENTRY_END 0xA2   /* - */
#define AP_GET_DONE 0xA3    /* - */
#define AP_ENTRY_ERROR 0xA4 /* relpath\0 message\0 (non-fatal) */
#define AP_STAT_RESULT 0xA5 /* u8 exists u8 type u32 mode u64 size i64 mtime_ns u32 uid u32 gid link\0 error\0 */
#define AP_OK 0xAF          /* - */
#define AP_ERROR 0xFF       /* i32 errno message\0 (ends the session) */

/* flags */
#define AP_EXEC_TTY 0x01
#define AP_EXEC_MERGE_STDERR 0x02
#define AP_PUT_HAS_MTIME 0x01
#define AP_MKDIR_PARENTS 0x01
#define AP_MKDIR_HAS_MTIME 0x02
#define AP_SYMLINK_REPLACE 0x01
#define AP_FOLLOW_LINKS 0x01
#define AP_GET_RECURSIVE 0x02

/* IDENTITY limits (checked before anything is changed) */
#define AP_IDENTITY_MAX_ENTROPY 512
#define AP_IDENTITY_MAC_LEN 6
#define AP_IDENTITY_MAX_HOSTNAME 64 /* HOST_NAME_MAX */
#define AP_IDENTITY_NET_LEN 9       /* u32 ip, u8 prefix, u32 gateway (0.0.0.0: none) */
#define AP_IDENTITY_DONE_NETWORK 0x01 /* in IDENTITY's OK: the address was replaced */

/* entry / stat types */
#define AP_T_FILE 0
#define AP_T_DIR 1
#define AP_T_SYMLINK 2
#define AP_T_OTHER 3

#endif
