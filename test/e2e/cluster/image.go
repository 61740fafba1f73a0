package cluster

import (
	"archive/tar"
	"bytes"
	"compress/gzip"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"os"
	"path"
	"sort"
	"time"
)

// Image is a container image made on this machine, without a registry or a
// container engine: a single layer of files, written as an OCI image layout
// tarball that `ctr images import` accepts.
type Image struct {
	Name       string // full reference, e.g. registry.k8s.io/pause:3.10
	Entrypoint []string
	Cmd        []string
	Files      []File
}

// File is one entry of an image layer. A Symlink entry has no content; a Dir
// entry neither.
type File struct {
	Path    string // absolute path in the image
	Mode    int64
	Data    []byte
	Symlink string
	Dir     bool
}

// HostFile reads a host file into a layer entry at dst.
func HostFile(src, dst string, mode int64) (File, error) {
	data, err := os.ReadFile(src)
	if err != nil {
		return File{}, fmt.Errorf("read %s for the image: %w", src, err)
	}
	return File{Path: dst, Mode: mode, Data: data}, nil
}

type descriptor struct {
	MediaType   string            `json:"mediaType"`
	Digest      string            `json:"digest"`
	Size        int64             `json:"size"`
	Annotations map[string]string `json:"annotations,omitempty"`
	Platform    map[string]string `json:"platform,omitempty"`
}

func digest(b []byte) string {
	s := sha256.Sum256(b)
	return "sha256:" + hex.EncodeToString(s[:])
}

// layer builds the uncompressed tar of the files, parents first.
func (img *Image) layer() ([]byte, error) {
	files := append([]File(nil), img.Files...)
	dirs := map[string]bool{"/": true}
	for _, f := range img.Files {
		for d := path.Dir(f.Path); !dirs[d]; d = path.Dir(d) {
			dirs[d] = true
			files = append(files, File{Path: d, Mode: 0o755, Dir: true})
		}
	}
	sort.Slice(files, func(i, j int) bool { return files[i].Path < files[j].Path })
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	mtime := time.Unix(0, 0)
	for _, f := range files {
		name := f.Path[1:]
		h := &tar.Header{Name: name, Mode: f.Mode, ModTime: mtime, Format: tar.FormatPAX}
		switch {
		case f.Dir:
			h.Typeflag, h.Name = tar.TypeDir, name+"/"
		case f.Symlink != "":
			h.Typeflag, h.Linkname, h.Mode = tar.TypeSymlink, f.Symlink, 0o777
		default:
			h.Typeflag, h.Size = tar.TypeReg, int64(len(f.Data))
		}
		if err := tw.WriteHeader(h); err != nil {
			return nil, fmt.Errorf("tar header %s: %w", f.Path, err)
		}
		if h.Typeflag == tar.TypeReg {
			if _, err := tw.Write(f.Data); err != nil {
				return nil, fmt.Errorf("tar %s: %w", f.Path, err)
			}
		}
	}
	if err := tw.Close(); err != nil {
		return nil, fmt.Errorf("close layer tar: %w", err)
	}
	return buf.Bytes(), nil
}

// WriteOCI writes the image as an OCI image layout tarball to dst.
func (img *Image) WriteOCI(dst string) error {
	layer, err := img.layer()
	if err != nil {
		return err
	}
	var gz bytes.Buffer
	// Fastest compression: the tarball is imported at once, never shipped.
	zw, err := gzip.NewWriterLevel(&gz, gzip.BestSpeed)
	if err != nil {
		return fmt.Errorf("compress layer: %w", err)
	}
	if _, err := zw.Write(layer); err != nil {
		return fmt.Errorf("compress layer: %w", err)
	}
	if err := zw.Close(); err != nil {
		return fmt.Errorf("compress layer: %w", err)
	}
	config, err := json.Marshal(map[string]any{
		"architecture": "amd64",
		"os":           "linux",
		"created":      "1970-01-01T00:00:00Z",
		"config": map[string]any{
			"Entrypoint": img.Entrypoint,
			"Cmd":        img.Cmd,
			"Env":        []string{"PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"},
		},
		"rootfs": map[string]any{"type": "layers", "diff_ids": []string{digest(layer)}},
	})
	if err != nil {
		return fmt.Errorf("image config: %w", err)
	}
	manifest, err := json.Marshal(map[string]any{
		"schemaVersion": 2,
		"mediaType":     "application/vnd.oci.image.manifest.v1+json",
		"config":        descriptor{MediaType: "application/vnd.oci.image.config.v1+json", Digest: digest(config), Size: int64(len(config))},
		"layers":        []descriptor{{MediaType: "application/vnd.oci.image.layer.v1.tar+gzip", Digest: digest(gz.Bytes()), Size: int64(gz.Len())}},
	})
	if err != nil {
		return fmt.Errorf("image manifest: %w", err)
	}
	index, err := json.Marshal(map[string]any{
		"schemaVersion": 2,
		"manifests": []descriptor{{
			MediaType: "application/vnd.oci.image.manifest.v1+json",
			Digest:    digest(manifest),
			Size:      int64(len(manifest)),
			Annotations: map[string]string{
				"io.containerd.image.name":          img.Name,
				"org.opencontainers.image.ref.name": img.Name,
			},
			Platform: map[string]string{"architecture": "amd64", "os": "linux"},
		}},
	})
	if err != nil {
		return fmt.Errorf("image index: %w", err)
	}

	var out bytes.Buffer
	tw := tar.NewWriter(&out)
	add := func(name string, data []byte) error {
		h := &tar.Header{Name: name, Mode: 0o644, Size: int64(len(data)), ModTime: time.Unix(0, 0), Typeflag: tar.TypeReg}
		if err := tw.WriteHeader(h); err != nil {
			return err
		}
		_, err := tw.Write(data)
		return err
	}
	blob := func(b []byte) string { return "blobs/sha256/" + digest(b)[len("sha256:"):] }
	for _, e := range []struct {
		name string
		data []byte
	}{
		{"oci-layout", []byte(`{"imageLayoutVersion":"1.0.0"}`)},
		{"index.json", index},
		{blob(manifest), manifest},
		{blob(config), config},
		{blob(gz.Bytes()), gz.Bytes()},
	} {
		if err := add(e.name, e.data); err != nil {
			return fmt.Errorf("write %s into the image tarball: %w", e.name, err)
		}
	}
	if err := tw.Close(); err != nil {
		return fmt.Errorf("close image tarball: %w", err)
	}
	if err := os.WriteFile(dst, out.Bytes(), 0o644); err != nil {
		return fmt.Errorf("write image tarball %s: %w", dst, err)
	}
	return nil
}

// NewBusyboxImage makes a busybox rootfs from the host's static busybox: the
// binary, a link for each applet, /etc/passwd, /etc/group and /tmp.
func NewBusyboxImage(name, busybox string, cmd []string) (*Image, error) {
	bb, err := HostFile(busybox, "/bin/busybox", 0o755)
	if err != nil {
		return nil, err
	}
	out, err := run(context.Background(), busybox, "--list-full")
	if err != nil {
		return nil, fmt.Errorf("list busybox applets: %w", err)
	}
	files := []File{
		bb,
		{Path: "/etc/passwd", Mode: 0o644, Data: []byte("root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n")},
		{Path: "/etc/group", Mode: 0o644, Data: []byte("root:x:0:\nnogroup:x:65534:\n")},
		{Path: "/tmp", Mode: 0o1777, Dir: true},
		{Path: "/root", Mode: 0o700, Dir: true},
	}
	for _, applet := range bytes.Fields([]byte(out)) {
		p := "/" + string(applet)
		if p == "/bin/busybox" {
			continue
		}
		files = append(files, File{Path: p, Symlink: "/bin/busybox"})
	}
	return &Image{Name: name, Cmd: cmd, Files: files}, nil
}
