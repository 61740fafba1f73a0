package fs

import (
	"encoding/binary"
	"fmt"
	"os"
	"unsafe"

	"golang.org/x/sys/unix"
)

// ext4Superblock holds the fields of an ext2/3/4 superblock that staging
// needs, read straight from the device instead of running dumpe2fs.
type ext4Superblock struct {
	blocks          uint64
	blockSize       uint64
	firstBlock      uint64
	blocksPerGroup  uint64
	inodeBlocksPerG uint64
	hasErrors       bool
}

const (
	ext4SuperOffset = 1024
	ext4Magic       = 0xEF53
	ext4StateErrors = 0x0002 // EXT4_ERROR_FS
	ext4Feature64   = 0x80   // EXT4_FEATURE_INCOMPAT_64BIT
)

// readExt4Superblock reads the primary superblock of device (layout from
// linux/fs/ext4/ext4.h, little endian).
func readExt4Superblock(device string) (ext4Superblock, error) {
	f, err := os.Open(device)
	if err != nil {
		return ext4Superblock{}, fmt.Errorf("opening %s: %w", device, err)
	}
	defer func() { _ = f.Close() }()
	b := make([]byte, 1024)
	if _, err := f.ReadAt(b, ext4SuperOffset); err != nil {
		return ext4Superblock{}, fmt.Errorf("reading the superblock of %s: %w", device, err)
	}
	le := binary.LittleEndian
	if le.Uint16(b[0x38:]) != ext4Magic {
		return ext4Superblock{}, fmt.Errorf("%s holds no ext2/3/4 superblock", device)
	}
	sb := ext4Superblock{
		blocks:         uint64(le.Uint32(b[0x04:])),
		blockSize:      1024 << le.Uint32(b[0x18:]),
		firstBlock:     uint64(le.Uint32(b[0x14:])),
		blocksPerGroup: uint64(le.Uint32(b[0x20:])),
		hasErrors:      le.Uint16(b[0x3A:])&ext4StateErrors != 0,
	}
	if le.Uint32(b[0x60:])&ext4Feature64 != 0 {
		sb.blocks |= uint64(le.Uint32(b[0x150:])) << 32
	}
	inodeSize := uint64(le.Uint16(b[0x58:]))
	if inodeSize == 0 {
		inodeSize = 128 // revision 0 filesystems
	}
	if sb.blockSize == 0 || sb.blocksPerGroup == 0 || sb.blockSize > 64<<10 {
		return ext4Superblock{}, fmt.Errorf("%s: implausible superblock (block size %d, %d blocks per group)", device, sb.blockSize, sb.blocksPerGroup)
	}
	sb.inodeBlocksPerG = (uint64(le.Uint32(b[0x28:]))*inodeSize + sb.blockSize - 1) / sb.blockSize
	return sb, nil
}

// blockDeviceSize returns the size of a block device in bytes
// (BLKGETSIZE64).
func blockDeviceSize(device string) (uint64, error) {
	f, err := os.Open(device)
	if err != nil {
		return 0, fmt.Errorf("opening %s: %w", device, err)
	}
	defer func() { _ = f.Close() }()
	var n uint64
	if _, _, errno := unix.Syscall(unix.SYS_IOCTL, f.Fd(), unix.BLKGETSIZE64, uintptr(unsafe.Pointer(&n))); errno != 0 {
		return 0, fmt.Errorf("BLKGETSIZE64 on %s: %w", device, errno)
	}
	return n, nil
}
