"""Starts lidar_ptq_node: CenterPoint detections (vision_msgs/Detection3DArray) from a
sensor_msgs/PointCloud2 topic.

    ros2 launch lidar_ptq lidar_ptq.launch.py input_topic:=/sensing/lidar/points \
        precision:=auto calibration_mode:=online
"""

from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument
from launch.substitutions import LaunchConfiguration, PathJoinSubstitution
from launch_ros.actions import Node
from launch_ros.substitutions import FindPackageShare


def generate_launch_description():
    arguments = [
        DeclareLaunchArgument(
            "input_topic",
            default_value="/points_raw",
            description="sensor_msgs/PointCloud2 topic to detect objects in",
        ),
        DeclareLaunchArgument(
            "params_file",
            default_value=PathJoinSubstitution(
                [FindPackageShare("lidar_ptq"), "config", "lidar_ptq_node.yaml"]
            ),
            description="ROS 2 parameter file of the node",
        ),
        DeclareLaunchArgument(
            "precision",
            default_value="auto",
            choices=["fp32", "int8", "auto"],
            description="fp32, int8, or auto (FP32 until a matching INT8 model is ready)",
        ),
        DeclareLaunchArgument(
            "calibration_mode",
            default_value="off",
            choices=["off", "online", "from-bag"],
            description="INT8 calibration: off, online (from live scans) or from-bag",
        ),
    ]
    node = Node(
        package="lidar_ptq",
        executable="lidar_ptq_node",
        name="lidar_ptq_node",
        output="screen",
        parameters=[
            LaunchConfiguration("params_file"),
            {
                "precision": LaunchConfiguration("precision"),
                "calibration.mode": LaunchConfiguration("calibration_mode"),
            },
        ],
        remappings=[("~/input/pointcloud", LaunchConfiguration("input_topic"))],
    )
    return LaunchDescription(arguments + [node])
