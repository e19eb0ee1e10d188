//! `lidar_ptq import openpcdet`: an OpenPCDet CenterPoint checkpoint and its model YAML
//! to our model file (DIR/model.safetensors, the description embedded) and a readable
//! copy of the description (DIR/model.yaml).

use anyhow::{Context, Result};
use lidar_ptq::import::openpcdet;
use lidar_ptq::model::ModelBundle;
use lidar_ptq::model::graph::Graph;
use std::path::PathBuf;

#[derive(clap::Subcommand)]
pub enum ImportCommand {
    /// OpenPCDet CenterPoint-Pillar (PillarVFE, PointPillarScatter, BaseBEVBackbone,
    /// CenterHead): a `.pth` checkpoint, legacy or zip, and the model's config YAML.
    Openpcdet(OpenpcdetArgs),
}

#[derive(clap::Args)]
pub struct OpenpcdetArgs {
    /// Checkpoint written by OpenPCDet (`checkpoint_epoch_N.pth`) or plain `torch.save`.
    #[arg(long)]
    checkpoint: PathBuf,
    /// The OpenPCDet model config it was trained with (`tools/cfgs/.../*.yaml`);
    /// `_BASE_CONFIG_` is looked up beside it and in the folders above.
    #[arg(long)]
    config: PathBuf,
    /// Output directory (created if missing): model.safetensors and model.yaml.
    #[arg(long)]
    out: PathBuf,
    /// Model name (default: openpcdet_<config file stem>).
    #[arg(long)]
    name: Option<String>,
}

pub fn run(cmd: &ImportCommand) -> Result<()> {
    match cmd {
        ImportCommand::Openpcdet(a) => openpcdet_verb(a),
    }
}

fn openpcdet_verb(a: &OpenpcdetArgs) -> Result<()> {
    let mut m = openpcdet::import(&a.checkpoint, &a.config).with_context(|| {
        format!(
            "importing {} with {}",
            a.checkpoint.display(),
            a.config.display()
        )
    })?;
    if let Some(n) = &a.name {
        m.config.name = n.clone();
    }
    std::fs::create_dir_all(&a.out).with_context(|| format!("creating {}", a.out.display()))?;
    let yaml = format!(
        "# Imported from OpenPCDet: {} with {} (lidar_ptq import openpcdet).\n{}",
        a.checkpoint.display(),
        a.config.display(),
        m.config.to_yaml()
    );
    let yaml_path = a.out.join("model.yaml");
    lidar_ptq::fsutil::write_atomic(&yaml_path, yaml.as_bytes())
        .with_context(|| format!("writing {}", yaml_path.display()))?;
    let model_path = a.out.join("model.safetensors");
    ModelBundle::save(&model_path, &m.config, &m.weights, &m.metadata)
        .with_context(|| format!("writing {}", model_path.display()))?;
    for n in &m.notes {
        log::warn!("{n}");
    }
    let graph = Graph::build(&m.config).map_err(|e| anyhow::anyhow!(e))?;
    println!(
        "imported {} ({} container, {} parameters, classes {}): {}",
        m.config.name,
        m.metadata
            .get("openpcdet_container")
            .map_or("?", String::as_str),
        graph.num_trainable(),
        m.config.classes().join(", "),
        model_path.display()
    );
    Ok(())
}
