// Command image writes a container image as a tarball that `ctr images import` and
// `docker load` read, without a container engine or a daemon: the files given with
// --add become one layer over an empty base, with the entrypoint, command and
// environment given. Written by hand on go-containerregistry because none of Debian's
// daemonless tools (umoci, skopeo, buildah) builds an image from loose files and writes a
// docker-archive in one step, and the timestamps here are fixed so the same inputs give
// the same image digest.
//
//	image --tag arges-appliance:0.1.0 --out appliance.tar \
//	  --add target/arges:/usr/local/bin/arges --add /usr/lib/ipxe:/usr/lib/ipxe \
//	  --entrypoint /usr/local/bin/arges --cmd run
package main

import (
	"archive/tar"
	"bytes"
	"flag"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path"
	"path/filepath"
	"sort"
	"strings"
	"time"

	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/tarball"
)

// list is a repeatable flag.
type list []string

func (l *list) String() string     { return strings.Join(*l, ",") }
func (l *list) Set(v string) error { *l = append(*l, v); return nil }

// epoch is every entry's and the image's time: the same inputs, the same digest.
var epoch = time.Unix(0, 0).UTC()

func main() {
	var adds, env, cmd, labels list
	tag := flag.String("tag", "", "image name and tag (required)")
	out := flag.String("out", "", "tarball to write (required)")
	entrypoint := flag.String("entrypoint", "", "entrypoint (one path)")
	workdir := flag.String("workdir", "/", "working directory")
	user := flag.String("user", "", "the user the entrypoint runs as (UID[:GID]; default root)")
	flag.Var(&adds, "add", "SRC:DEST, a file or folder copied into the image (repeatable)")
	flag.Var(&env, "env", "KEY=VALUE (repeatable)")
	flag.Var(&cmd, "cmd", "a command argument (repeatable, in order)")
	flag.Var(&labels, "label", "KEY=VALUE (repeatable)")
	flag.Parse()
	if err := run(*tag, *out, *entrypoint, *workdir, *user, adds, env, cmd, labels); err != nil {
		fmt.Fprintln(os.Stderr, "error:", err)
		os.Exit(1)
	}
}

func run(tag, out, entrypoint, workdir, user string, adds, env, cmd, labels list) error {
	if tag == "" || out == "" || len(adds) == 0 {
		return fmt.Errorf("--tag, --out and at least one --add are required")
	}
	ref, err := name.NewTag(tag)
	if err != nil {
		return fmt.Errorf("--tag %q: %w", tag, err)
	}
	layerTar, err := layer(adds)
	if err != nil {
		return err
	}
	l, err := tarball.LayerFromOpener(func() (io.ReadCloser, error) {
		return io.NopCloser(bytes.NewReader(layerTar)), nil
	})
	if err != nil {
		return fmt.Errorf("layer: %w", err)
	}
	img, err := mutate.AppendLayers(empty.Image, l)
	if err != nil {
		return fmt.Errorf("layer: %w", err)
	}
	cfg, err := img.ConfigFile()
	if err != nil {
		return err
	}
	cfg = cfg.DeepCopy()
	cfg.Architecture, cfg.OS = "amd64", "linux"
	cfg.Created = v1.Time{Time: epoch}
	cfg.Config.Env = append([]string{"PATH=/usr/local/bin:/usr/bin:/bin"}, env...)
	if entrypoint != "" {
		cfg.Config.Entrypoint = []string{entrypoint}
	}
	cfg.Config.Cmd = cmd
	cfg.Config.WorkingDir = workdir
	cfg.Config.User = user
	cfg.Config.Labels = map[string]string{}
	for _, kv := range labels {
		k, v, ok := strings.Cut(kv, "=")
		if !ok {
			return fmt.Errorf("--label %q: not KEY=VALUE", kv)
		}
		cfg.Config.Labels[k] = v
	}
	img, err = mutate.ConfigFile(img, cfg)
	if err != nil {
		return err
	}
	if err := tarball.WriteToFile(out, ref, img); err != nil {
		return fmt.Errorf("write %s: %w", out, err)
	}
	digest, err := img.Digest()
	if err != nil {
		return err
	}
	size, err := l.Size()
	if err != nil {
		return err
	}
	fmt.Printf("%s %s layer %d bytes (compressed)\n", tag, digest, size)
	return nil
}

// layer is the tar of every --add, parents first, entries sorted, owned by root, over
// an empty /tmp that anyone may write (as on any root filesystem).
func layer(adds list) ([]byte, error) {
	type entry struct {
		src  string // "" for a directory made only as a parent
		mode fs.FileMode
	}
	entries := map[string]entry{"/tmp": {mode: fs.ModeDir | fs.ModeSticky | 0o777}}
	parents := func(dest string) {
		for d := path.Dir(dest); d != "/" && d != "."; d = path.Dir(d) {
			if _, ok := entries[d]; !ok {
				entries[d] = entry{mode: fs.ModeDir | 0o755}
			}
		}
	}
	for _, a := range adds {
		src, dest, ok := strings.Cut(a, ":")
		if !ok || !strings.HasPrefix(dest, "/") {
			return nil, fmt.Errorf("--add %q: not SRC:/DEST", a)
		}
		dest = path.Clean(dest)
		err := filepath.WalkDir(src, func(p string, d fs.DirEntry, err error) error {
			if err != nil {
				return err
			}
			rel, err := filepath.Rel(src, p)
			if err != nil {
				return err
			}
			target := path.Join(dest, filepath.ToSlash(rel))
			info, err := os.Stat(p) // follows links: the image holds what they point to
			if err != nil {
				return err
			}
			parents(target)
			entries[target] = entry{src: p, mode: info.Mode()}
			return nil
		})
		if err != nil {
			return nil, fmt.Errorf("--add %q: %w", a, err)
		}
	}
	names := make([]string, 0, len(entries))
	for n := range entries {
		names = append(names, n)
	}
	sort.Strings(names)
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	for _, n := range names {
		e := entries[n]
		h := &tar.Header{Name: strings.TrimPrefix(n, "/"), ModTime: epoch, Mode: int64(e.mode.Perm()), Format: tar.FormatPAX}
		if e.mode&fs.ModeSticky != 0 {
			h.Mode |= 0o1000
		}
		if e.mode.IsDir() {
			h.Typeflag, h.Name = tar.TypeDir, h.Name+"/"
			if err := tw.WriteHeader(h); err != nil {
				return nil, err
			}
			continue
		}
		data, err := os.ReadFile(e.src)
		if err != nil {
			return nil, err
		}
		h.Typeflag, h.Size = tar.TypeReg, int64(len(data))
		if err := tw.WriteHeader(h); err != nil {
			return nil, err
		}
		if _, err := tw.Write(data); err != nil {
			return nil, err
		}
	}
	if err := tw.Close(); err != nil {
		return nil, err
	}
	return buf.Bytes(), nil
}
